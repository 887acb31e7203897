"""Restore drills, pure parts (salt/_modules/_qborg_drill.py and the client's
salt/qborg/files/client/qborg-drill): which archive, which file, when a
drill is due, the setting, and what status says. Real borg:
tests/integration/test_drill.py and tests/e2e/test_drill.py."""

import importlib.machinery
import importlib.util
import json
import random

import pytest

import _qborg_base as base_mod
import _qborg_drill as drill
import _qborg_maint as maint
import _qborg_settings as settings_mod

from .conftest import REPO

CLIENT = REPO / "salt" / "qborg" / "files" / "client" / "qborg-drill"


def client_program():
    loader = importlib.machinery.SourceFileLoader("qborg_drill_program", str(CLIENT))
    spec = importlib.util.spec_from_loader("qborg_drill_program", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def item(path, size, kind="-", source=""):
    return json.dumps({"type": kind, "path": path, "size": size, "source": source})


LISTING = [
    item("home/user", 0, "d"),
    item("home/user/empty", 0),
    item("home/user/a.txt", 10),
    item("home/user/b.txt", 20),
    item("home/user/link", 1, "l"),
    item("home/user/hard", 10, source="home/user/a.txt"),
    item("home/user/big.img", 100),
    "not json",
    json.dumps(["a", "list"]),
    item("home/user/odd", "12"),
    # names borg's pp: pattern would read otherwise (normalised): never picked
    item("home/user/../x", 5),
    item("/etc/abs", 5),
    item("home//user/y", 5),
    item("home/user/./z", 5),
    item("home/user/dir/", 5),
]


@pytest.fixture(params=["core", "client"])
def picker(request):
    if request.param == "core":
        return lambda lines, cap, rng: drill.pick_file(lines, cap, rng)[0]
    program = client_program()
    return program.pick_file


def test_a_drill_picks_only_regular_files_with_data_up_to_the_cap(picker):
    seen = set()
    for seed in range(200):
        chosen = picker(iter(LISTING), 50, random.Random(seed))
        seen.add(chosen["path"])
    # each of the two candidates, and nothing else
    assert seen == {"home/user/a.txt", "home/user/b.txt"}


def test_with_no_file_under_the_cap_the_smallest_is_read(picker):
    lines = [item("home/user/big.img", 100), item("home/user/bigger.img", 300)]
    assert picker(iter(lines), 50, random.Random(1)) == {"path": "home/user/big.img",
                                                         "size": 100}
    assert picker(iter([item("home/user/d", 0, "d")]), 50, random.Random(1)) is None


def test_the_count_of_candidates_is_reported():
    _chosen, small = drill.pick_file(iter(LISTING), 50, random.Random(0))
    assert small == 2


@pytest.mark.parametrize("latest", [drill.latest_archive,
                                    lambda listing, now: client_program().latest_archive(
                                        listing, now)])
def test_the_latest_archive_leaves_out_checkpoints_and_the_future(latest):
    now = 2_000_000_000
    listing = {"archives": [
        {"name": "vm-2030", "time": "2030-01-01T00:00:00"},
        {"name": "vm-2031.checkpoint", "time": "2031-06-01T00:00:00"},
        {"name": "vm-bad", "time": "year one"},
        {"name": "vm-2029", "time": "2029-01-01T00:00:00"},
    ]}
    assert latest(listing, now)["name"] == "vm-2030"
    assert latest({"archives": []}, now) is None


def test_a_drill_is_due_when_none_ran_after_a_failure_or_after_the_interval():
    assert drill.drill_due(None, 3600, 10_000)
    assert drill.drill_due({"ok": False, "time": 9_999}, 3600, 10_000)
    assert not drill.drill_due({"ok": True, "time": 9_000}, 3600, 10_000)
    assert drill.drill_due({"ok": True, "time": 6_400}, 3600, 10_000)
    assert drill.drill_due({"ok": True, "time": 9_999}, 0, 10_000)


@pytest.mark.parametrize("given, expected", [
    (None, None), (False, None), (True, 0), ("1w", 604800), ("2d", 172800)])
def test_the_drill_setting(given, expected):
    raw = {} if given is None else {"maintenance": {"drill": given}}
    assert settings_mod.maintenance_settings(raw)["drill_interval_seconds"] == expected


@pytest.mark.parametrize("given", ["weekly", "0d", 3, "yes", ["1w"]])
def test_a_bad_drill_setting_names_the_field(given):
    with pytest.raises(base_mod.QborgConfigError) as exc:
        settings_mod.maintenance_settings({"maintenance": {"drill": given}})
    assert "qborg:maintenance:drill" in str(exc.value)


def test_borg_words_takes_the_error_line_not_the_traceback():
    stderr = ("Data integrity error: Segment entry checksum mismatch [segment 2, offset 8]\n"
              "Traceback (most recent call last):\n  File \"x\", line 1\n"
              "borg.helpers.errors.IntegrityError: Data integrity error: ...\n")
    assert drill.borg_words(stderr).startswith("Data integrity error: Segment entry checksum")
    assert drill.borg_words("a\n\x1b[31mlast\n") == "\\x1b[31mlast"
    assert drill.borg_words("") == "no word from borg"


OK = {"ok": True, "iso": "2030-01-01T00:00:00Z", "file": "home/user/a.txt", "bytes": 10,
      "size": 10, "archive": "vm-1", "partial": False}
FAILED = {"ok": False, "iso": "2030-01-01T00:00:00Z",
          "error": "borg extract of home/user/a.txt from archive vm-1 failed (exit 2): Data "
                   "integrity error"}


def test_the_summaries():
    assert drill.drill_summary(None) == "never"
    assert drill.drill_summary(OK) == ("2030-01-01T00:00:00Z ok (home/user/a.txt, 10 bytes, "
                                       "archive vm-1)")
    assert drill.drill_summary(dict(OK, partial=True, bytes=64, size=100)).startswith(
        "2030-01-01T00:00:00Z ok (home/user/a.txt, first 64 of 100 bytes")
    assert drill.drill_summary(FAILED).startswith("2030-01-01T00:00:00Z FAILED: borg extract")
    program = client_program()
    assert program.summary(None) == "never: run borgbak drill"
    assert program.summary(OK) == drill.drill_summary(OK)
    assert program.summary(FAILED) == drill.drill_summary(FAILED)


def entry(vm, drill_record):
    return {"vm": vm, "last_archive_time": None, "age_seconds": None, "archives": 1,
            "repository_size": None, "key_age_seconds": None, "alarm": False,
            "alarm_archives": [], "error": None, "stale": False, "rotation": None,
            "drill": drill_record, "drill_failed": bool(drill_record and
                                                        drill_record["ok"] is False)}


def test_status_shows_each_copys_last_drill_and_a_failure_as_an_alarm():
    table = maint.status_table({"vms": [entry("vm-a", OK), entry("vm-b", FAILED),
                                        entry("vm-c@offsite", None)],
                                "last_maintenance_run": None})
    lines = table.splitlines()
    row_b = next(line for line in lines if line.startswith("vm-b "))
    assert "ALARM: restore drill FAILED" in row_b
    assert "ALARM" not in next(line for line in lines if line.startswith("vm-a "))
    assert "vm-a: last drill: 2030-01-01T00:00:00Z ok (home/user/a.txt, 10 bytes" in table
    assert "vm-b: last drill: 2030-01-01T00:00:00Z FAILED: borg extract" in table
    assert "vm-c@offsite: last drill: never" in table
    assert lines[-1] == "last maintenance run: never"


def test_the_drill_record_lives_with_the_copys_maintenance_state(tmp_path):
    home = str(tmp_path)
    assert drill.drill_path(home, "vm-a").endswith("/.local/state/qborg/maint/vm-a.drill.json")
    assert drill.drill_path(home, "vm-a", "offsite").endswith(
        "/.local/state/qborg/maint-offsite/vm-a.drill.json")
    with pytest.raises(base_mod.QborgError):
        drill.drill_path(home, "../x")
    assert drill.last_drill(home, "vm-a") is None
    base_mod.save_json(drill.drill_path(home, "vm-a"), OK)
    assert drill.last_drill(home, "vm-a") == OK


def test_of_two_archives_in_one_second_the_one_listed_later_is_the_latest():
    listing = {"archives": [{"name": "vm-1", "time": "2030-01-01T00:00:00.000000"},
                            {"name": "vm-2", "time": "2030-01-01T00:00:00.000000"}]}
    assert drill.latest_archive(listing, 2_000_000_000)["name"] == "vm-2"
    assert client_program().latest_archive(listing, 2_000_000_000)["name"] == "vm-2"
