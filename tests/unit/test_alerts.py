"""Desktop notices: the pillar settings, the one-notice-per-change rule,
the client's qborg-notify (its state, its pending notices) and the core's
admin notices; the D-Bus call itself is checked against a real
dbus-daemon in tests/e2e/test_alerts.py."""

import ast
import importlib.machinery
import importlib.util
import json
import os
import pathlib
import time

import pytest

import _qborg_alerts as alerts
import _qborg_notify as notify
from _qborg_base import QborgConfigError
from _qborg_settings import maintenance_settings, validate_settings

from .conftest import REPO

CLIENT = REPO / "salt" / "qborg" / "files" / "client" / "qborg-notify"
CORE = REPO / "salt" / "_modules"


def load_client():
    name = "qborg_notify_under_test"
    loader = importlib.machinery.SourceFileLoader(name, str(CLIENT))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


def raw(**vm):
    return {"admin_vm": "backup-admin", "user": "user",
            "server": {"provider": "rsync.net", "host": "de1.rsync.net", "user": "de1"},
            "defaults": {"encryption": "repokey-blake2", "compression": "auto,zstd",
                         "source_directories": ["~"], "interval": "1h"},
            "vms": {"vm-personal": vm}}


# ------------------------------------------------------------------ settings


def test_notify_and_stale_after_default_to_all_and_2():
    vm = validate_settings(raw())["vms"]["vm-personal"]
    assert vm["notify"] == "all" and vm["stale_after"] == 2


@pytest.mark.parametrize("value", ["all", "failures", "off"])
def test_each_notify_choice_is_taken(value):
    assert validate_settings(raw(notify=value))["vms"]["vm-personal"]["notify"] == value


@pytest.mark.parametrize("value", ["sometimes", "", None, True, 1])
def test_a_bad_notify_names_the_field_and_the_choices(value):
    with pytest.raises(QborgConfigError) as exc:
        validate_settings(raw(notify=value))
    assert "qborg:vms:vm-personal:notify" in str(exc.value)
    assert "all, failures, off" in str(exc.value)


def test_a_bad_default_names_the_defaults_field():
    settings = raw()
    settings["defaults"]["stale_after"] = 0.5
    with pytest.raises(QborgConfigError) as exc:
        validate_settings(settings)
    assert "qborg:defaults:stale_after" in str(exc.value)


@pytest.mark.parametrize("value", [0, 0.99, 1001, "2", True, None, -3])
def test_a_bad_stale_after_is_refused(value):
    with pytest.raises(QborgConfigError) as exc:
        validate_settings(raw(stale_after=value))
    assert "qborg:vms:vm-personal:stale_after" in str(exc.value)


@pytest.mark.parametrize("value,kept", [(1, 1), (2.0, 2), (1.5, 1.5), (1000, 1000)])
def test_stale_after_takes_a_multiple_of_the_interval(value, kept):
    assert validate_settings(raw(stale_after=value))["vms"]["vm-personal"]["stale_after"] == kept


def test_maintenance_notify_is_all_or_off():
    assert maintenance_settings({})["notify"] == "all"
    assert maintenance_settings({"maintenance": {"notify": "off"}})["notify"] == "off"
    with pytest.raises(QborgConfigError) as exc:
        maintenance_settings({"maintenance": {"notify": "failures"}})
    assert "qborg:maintenance:notify" in str(exc.value)


def test_the_status_of_the_admin_qube_uses_stale_after():
    text = (CORE / "_qborg_maint.py").read_text()
    assert "2 * interval" not in text and 'is_stale(ts, now, interval, settings["vms"][vm]' \
        "[\"stale_after\"])" in text


# ------------------------------------------------------------------ the rule


@pytest.mark.parametrize("told,current,mode,failing,expected", [
    ("ok", "failed", "all", True, ("failed", "failed")),
    ("failed", "failed", "all", True, (None, "failed")),       # failed again: silent
    ("failed", "ok", "all", False, ("ok", "ok")),              # back to normal, once
    ("ok", "ok", "all", False, (None, "ok")),
    ("ok", "stale", "all", True, ("stale", "stale")),
    ("failed", "stale", "all", True, ("stale", "stale")),
    ("stale", "stale", "all", True, (None, "stale")),
    ("stale", "ok", "all", False, ("ok", "ok")),
    ("ok", "stale", "failures", False, (None, "ok")),          # no stale notice
    ("ok", "stale", "failures", True, ("failed", "failed")),   # told as a failure
    ("failed", "stale", "failures", True, (None, "failed")),
    ("failed", "ok", "failures", False, ("ok", "ok")),
    ("ok", "failed", "off", True, (None, "ok")),
    ("failed", "ok", "off", False, (None, "failed")),
    ("ok", "alarm", "all", False, ("alarm", "alarm")),
    ("alarm", "alarm", "all", False, (None, "alarm")),
])
def test_one_notice_per_change_of_state(told, current, mode, failing, expected):
    assert alerts.next_told(told, current, mode, failing) == expected


def test_stale_is_older_than_stale_after_intervals_and_the_future_counts_as_now():
    assert alerts.is_stale(None, 1000, 60, 2)
    assert not alerts.is_stale(1000 - 120, 1000, 60, 2)
    assert alerts.is_stale(1000 - 121, 1000, 60, 2)
    assert not alerts.is_stale(5000, 1000, 60, 2)


def test_pending_notices_are_bounded():
    pending = []
    for n in range(25):
        pending = alerts.queued(pending, {"n": n})
    assert [p["n"] for p in pending] == list(range(5, 25))


def _functions(path, names):
    tree = ast.parse(path.read_text())
    found = {n.name: ast.dump(n) for n in tree.body
             if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name in names}
    assert set(found) == set(names), (path, set(names) - set(found))
    return found


def test_the_client_keeps_an_equal_copy_of_the_rule_and_of_the_dbus_call():
    rule = ("is_stale", "next_told", "queued")
    assert _functions(CLIENT, rule) == _functions(CORE / "_qborg_alerts.py", rule)
    wire = ("NoSession", "NotShown", "session_bus_path", "_pad", "_put_string", "_message",
            "_notify_body", "_recv_exact", "_read_message", "_call", "send_notice")
    assert _functions(CLIENT, wire) == _functions(CORE / "_qborg_notify.py", wire)


def test_the_session_bus_is_found_without_cron_giving_an_address():
    find = notify.session_bus_path
    assert find({}, uid=1000) == "/run/user/1000/bus"
    assert find({"XDG_RUNTIME_DIR": "/run/user/7"}, uid=1000) == "/run/user/7/bus"
    assert find({"DBUS_SESSION_BUS_ADDRESS": "unix:path=/tmp/b,guid=ab"}, uid=1) == "/tmp/b"
    assert find({"DBUS_SESSION_BUS_ADDRESS": "unix:abstract=/x"}, uid=5) == "/run/user/5/bus"


def test_notify_is_marshalled_as_the_spec_says():
    body = notify._notify_body("qborg", "s", "b", 2)
    assert body == (b"\x05\0\0\0qborg\0" + b"\0\0"          # app_name, aligned to 4
                    + b"\0\0\0\0"                             # replaces_id 0
                    + b"\0\0\0\0\0"                           # app_icon "" (+ 3 pad)
                    + b"\0\0\0"
                    + b"\x01\0\0\0s\0\0\0\x01\0\0\0b\0\0\0"   # summary, body
                    + b"\0\0\0\0"                             # actions: empty as
                    + b"\x10\0\0\0"                           # a{sv}: 16 bytes, at 8
                    + b"\x07\0\0\0urgency\0\x01y\0\x02"       # {"urgency": <byte 2>}
                    + b"\xff\xff\xff\xff")                    # expire_timeout -1


def test_no_session_bus_is_no_session(tmp_path):
    with pytest.raises(notify.NoSession):
        notify.send_notice("s", "b", path=str(tmp_path / "bus"))


# ------------------------------------------------------------------ the client


class FakeBus:
    def __init__(self):
        self.shown, self.up = [], True

    def __call__(self, summary, body, urgency=1, **_kwargs):
        if not self.up:
            raise prog.NoSession("no desktop session bus")
        self.shown.append((summary, body, urgency))
        return len(self.shown) + 1


prog = load_client()


@pytest.fixture
def client(tmp_path, monkeypatch):
    bus = FakeBus()
    monkeypatch.setattr(prog, "send_notice", bus)
    clock = [1_000_000.0]
    monkeypatch.setattr(prog, "now", lambda: clock[0])
    state = tmp_path / "state"
    state.mkdir()
    logged = []

    def run(*extra):
        args = ["--state", str(state), "--vm", "vm-personal", "--interval", "1h", *extra]
        return prog.run(prog.parse(args), log=logged.append)

    def good(ago=0):
        (state / "last-success").write_text(f"{int(clock[0] - ago)} iso\n")
        if (state / "last-error").exists():
            (state / "last-error").unlink()

    def fail(text="2030-01-01T00:00:00+0000 create exit 2: the backup server could not be "
                  "reached: the next run retries"):
        (state / "last-error").write_text(text + "\n")

    class Client:
        pass

    c = Client()
    c.bus, c.clock, c.state, c.run, c.good, c.fail, c.logged = (
        bus, clock, state, run, good, fail, logged)
    return c


def test_failed_once_silent_again_back_to_normal_once(client):
    client.good(ago=1800)
    client.run()
    assert client.bus.shown == []
    client.fail()
    client.run()
    client.run()
    assert [s for s, _b, _u in client.bus.shown] == ["Backup of vm-personal failed"]
    assert client.bus.shown[0][1] == ("the backup server could not be reached: the next "
                                      "run retries")
    assert client.bus.shown[0][2] == 2
    client.good()
    client.run()
    client.run()
    assert [s for s, _b, _u in client.bus.shown][1:] == [
        "Backups of vm-personal are back to normal"]
    record = json.loads((client.state / "notice.json").read_text())
    assert record == {"told": "ok", "pending": []}
    assert os.stat(client.state / "notice.json").st_mode & 0o777 == 0o600


def test_stale_once_with_its_rule_and_the_copy_named(client):
    client.good(ago=3 * 3600 + 60)
    client.fail()
    client.run("--copy", "offsite", "--stale-after", "2")
    client.run("--copy", "offsite", "--stale-after", "2")
    assert len(client.bus.shown) == 1
    summary, body, _u = client.bus.shown[0]
    assert summary == "No recent backup of vm-personal (copy offsite)"
    assert body.startswith("Last good backup: 3h 1m ago (more than 2 x 1h). Last error: the "
                           "backup server")


def test_failures_tells_a_stale_failing_copy_as_failed_and_off_tells_nothing(client):
    client.good(ago=3 * 3600)
    client.fail()
    client.run("--notify", "off")
    assert client.bus.shown == []
    client.run("--notify", "failures")
    assert [s for s, _b, _u in client.bus.shown] == ["Backup of vm-personal failed"]


def test_without_a_session_the_notices_wait_in_order_and_each_is_told_once(client):
    client.bus.up = False
    client.good(ago=1800)
    client.fail()
    client.run()
    client.good()
    client.run()
    record = json.loads((client.state / "notice.json").read_text())
    assert [n["kind"] for n in record["pending"]] == ["failed", "ok"]
    assert any("waits for a desktop session" in line for line in client.logged)
    client.bus.up = True
    client.run()
    client.run()
    assert [s for s, _b, _u in client.bus.shown] == [
        "Backup of vm-personal failed", "Backups of vm-personal are back to normal"]


def test_a_notice_carries_no_secret_and_no_control_character(client):
    client.good(ago=1800)
    client.fail("2030-01-01T00:00:00+0000 create exit 2: borg said \x1b[31mred\x1b[0m\nnext")
    client.run()
    _s, body, _u = client.bus.shown[0]
    assert "\x1b" not in body and "\n" not in body
    # it reads the copy's state directory only, never ~/.config/qborg (the
    # key and passphrase) nor borg's environment
    text = CLIENT.read_text()
    assert ".config" not in text and "BORG_" not in text and "environ[" not in text


def test_a_bad_record_starts_over_as_told_ok(client):
    (client.state / "notice.json").write_text("{not json")
    client.good(ago=1800)
    client.fail()
    client.run()
    assert len(client.bus.shown) == 1


@pytest.mark.parametrize("argv", [["--vm", "dom0"], ["--vm", "a b"], ["--interval", "1x"],
                                  ["--copy", "Bad!"], ["--stale-after", "0.5"]])
def test_bad_arguments_are_refused(client, argv):
    base = {"--state": str(client.state), "--vm": "vm-personal"}
    for key, value in zip(argv[::2], argv[1::2]):
        base[key] = value
    with pytest.raises(SystemExit):
        prog.parse([x for kv in base.items() for x in kv])


# ------------------------------------------------------------------ the admin


def test_admin_notices_once_per_change_and_wait_without_a_session(tmp_path, monkeypatch):
    settings = validate_settings(raw())
    states = {"vm-personal": ("alarm", "archives vanished: x")}
    monkeypatch.setattr(notify, "copy_states", lambda s, h, labels, now: dict(states))
    shown = []
    up = [False]

    def send(summary, body, urgency=1):
        if not up[0]:
            raise notify.NoSession("no bus")
        shown.append(summary)
        return 2

    home = str(tmp_path)
    maint = {"notify": "all"}
    lines = notify.admin_notices(settings, maint, home, None, {"vm-personal"}, send=send)
    assert shown == [] and "waits for a desktop session" in lines[0]
    up[0] = True
    notify.admin_notices(settings, maint, home, None, {"vm-personal"}, send=send)
    notify.admin_notices(settings, maint, home, None, {"vm-personal"}, send=send)
    assert shown == ["qborg ALARM: vm-personal"]
    states["vm-personal"] = ("ok", "")
    notify.admin_notices(settings, maint, home, None, {"vm-personal"}, send=send)
    assert shown == ["qborg ALARM: vm-personal", "vm-personal is back to normal"]
    path = pathlib.Path(notify.notices_path(home))
    assert os.stat(path).st_mode & 0o777 == 0o600
    states["vm-personal"] = ("stale", "no archive")
    notify.admin_notices(settings, {"notify": "off"}, home, None, {"vm-personal"}, send=send)
    assert len(shown) == 2


def test_a_failed_restore_drill_is_an_alarm_of_the_admin_qube(tmp_path):
    """copy_states reads the drill's own record: a failed drill puts the
    copy in ALARM (one notice), a good one after it is back to normal."""
    from _qborg_base import save_json
    from _qborg_drill import drill_path
    settings = validate_settings(raw())
    home = str(tmp_path)
    now = time.time()
    record = {"ok": False, "time": now, "iso": "x", "error": "Data integrity error\nin archive a"}
    path = drill_path(home, "vm-personal")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_json(path, record, None)
    state, why = notify.copy_states(settings, home, {"vm-personal"}, now)["vm-personal"]
    assert state == "alarm" and why.startswith("restore drill FAILED: Data integrity error")
    assert "\n" not in why
    save_json(path, dict(record, ok=True), None)
    assert notify.copy_states(settings, home, {"vm-personal"}, now)["vm-personal"][0] != "alarm"


def test_a_name_a_vm_chose_brings_no_markup_into_the_admin_qubes_notice():
    summary, body = notice_text_of('archive <a href="http://x">a&b</a>\x1b[31m vanished')
    assert "<" not in body and ">" not in body and "&" not in body and "\x1b" not in body
    assert "vanished" in body and summary == "qborg ALARM: vm-personal"


def notice_text_of(why):
    return notify.notice_text("alarm", "vm-personal", why)
