"""Several Qubes machines on one server account, end to end: the session's
lab plays the machine that was there first (no qborg:installation, as every
single machine), a second lab of its own plays the second machine
(installation `lap`: its own dom0, admin qube, admin key and vm-personal).
The second lab's pillar points at the first lab's server account, which
lets its admin key in only once it is added there by hand, as a user does.

Both apply in turn, twice; after each round every VM of both backs up, each
authorized_keys block is what its own admin qube made, and neither
installation touched the other's repositories. Then the refusals: a
repository that is the other installation's, and an admin qube that forgot
its name, fail naming both, with the account's authorized_keys unchanged.

The second lab's tag: $QBORG_LAB_TAG2, else the session lab's tag and "i"
(e2ea -> e2eai), so it runs beside the labs of other runs."""

import glob
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

import pytest

from helpers import applied_ok, ADMIN, archives, failed, keystore, read_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "salt", "_modules"))

import qborg_lab  # noqa: E402
import _qborg_settings as settings_mod  # noqa: E402
import _qborg_repos as repos  # noqa: E402
import _qborg_keystore as keystore_mod  # noqa: E402
import _qborg_admin as admin  # noqa: E402

NAME = "lap"  # the second machine's qborg:installation
B_VMS = ("vm-personal",)
TIMES = {}  # what the module's steps took, printed at the end (-s)


def second_tag(first):
    tag = os.environ.get("QBORG_LAB_TAG2") or (first + "i")[:6]
    if tag == first:
        tag = first[:5] + "j"
    return qborg_lab._check_tag(tag)


def admin_side(lab):
    """(settings, keystore) of a lab's admin qube, as its own apply left them."""
    with open(os.path.join(lab.prefix(ADMIN), "etc", "qborg", "admin.json")) as f:
        settings = settings_mod.validate_settings(json.load(f))
    return settings, keystore_mod.Keystore(keystore(lab))


def repository_files(server_home, path):
    """{relative path: sha256} of a repository's files (borg's locks aside)."""
    root = os.path.join(server_home, path)
    out = {}
    for found in glob.glob(os.path.join(root, "**"), recursive=True):
        if os.path.isfile(found) and "/lock." not in found:
            with open(found, "rb") as f:
                out[os.path.relpath(found, root)] = hashlib.sha256(f.read()).hexdigest()
    return out


def seed(lab, vm, name):
    """A file only this lab's vm has, in the backed-up ~/Documents."""
    lab.run(vm, ["/usr/bin/python3", "-c",
                 "import os,sys; p=os.path.expanduser('~/Documents/'+sys.argv[1]);"
                 "os.makedirs(os.path.dirname(p), exist_ok=True); open(p,'w').write(sys.argv[1])",
                 name])


def backup(lab, vm):
    proc = lab.run(vm, ["qborg-backup"], check=False)
    assert proc.returncode == 0, (lab.tag, vm, proc.stdout + proc.stderr)
    names = archives(lab, vm)
    listing = lab.run(vm, ["borgbak", "list", names[-1], "--short"]).stdout
    return names, listing


@pytest.fixture(scope="module")
def two(lab):
    """The second lab, up, its pillar pointing at the session lab's server
    (installation `lap`, vm-personal only), its admin key trusted there.
    Afterwards: the second lab down, and on the session lab's account its
    block, its admin key and its repositories removed, the session lab's
    pillar back and its admin qube applied again."""
    first_pillar = lab.user_pillar()
    directory = tempfile.mkdtemp(prefix="qborg-lab-", dir="/var/tmp")
    other = qborg_lab.Lab(directory=directory, tag=second_tag(lab.tag))
    pub = None
    try:
        started = time.monotonic()
        other.up()
        TIMES["second lab up"] = time.monotonic() - started
        with open(other.admin_key_path + ".pub") as f:
            pub = f.read().strip()
        lab.trust_admin_key(pub, "qborg-lab-admin-" + other.tag)
        other.use_server(lab)
        pillar = other.user_pillar()
        pillar["qborg"]["installation"] = NAME
        pillar["qborg"]["vms"] = {vm: {} for vm in B_VMS}
        other.set_pillar(pillar)
        yield other
    finally:
        started = time.monotonic()
        other.down()
        path = lab.authorized_keys_path
        with open(path, encoding="utf-8", newline="") as f:
            text = f.read()
        before, _lines, after = repos.split_managed_block(text, NAME)
        with open(path, "w", encoding="utf-8", newline="") as f:  # keeps owner and mode
            f.write(before + after)
        if pub:
            lab.distrust_admin_key(pub)
        shutil.rmtree(os.path.join(lab.home(lab.server_user), "qborg", NAME), ignore_errors=True)
        lab.set_pillar(first_pillar)
        applied_ok(lab, ADMIN)
        TIMES["second lab down, first restored"] = time.monotonic() - started
        print("\ntest_installations timings: " + ", ".join(
            f"{what} {seconds:.1f}s" for what, seconds in TIMES.items()))


def check_blocks(lab, other, outside):
    """Each installation's block holds exactly the lines its own admin qube
    makes, the other lines of the file are as they were (outside)."""
    text = read_bytes(lab.authorized_keys_path).decode()
    for who in (lab, other):
        if not os.path.exists(os.path.join(who.prefix(ADMIN), "etc", "qborg", "admin.json")):
            # not applied yet: no block of its own
            assert f"# BEGIN qborg {NAME}" not in text and who is other
            continue
        settings, store = admin_side(who)
        name = settings["installation"]
        expected = admin.managed_lines(settings, store)
        assert repos.split_managed_block(text, name)[1] == expected, (who.tag, text)
        vms = sorted(vm for vm in settings["vms"])
        assert [l.rsplit(" ", 1)[-1] for l in expected] == [repos.key_comment(vm, name)
                                                           for vm in vms]
        assert [repos.restricted_paths(l) for l in expected] == [
            [f"qborg/{name}/{vm}" if name else f"qborg/{vm}"] for vm in vms]
    assert [l for owner, l in repos.lines_by_block(text)
            if owner is None and not repos.MARKER_RE.match(l)] == outside


def test_two_installations_apply_in_turn_twice_and_every_vm_backs_up(lab, two):
    other, home = two, lab.home(lab.server_user)
    a_vms = sorted(lab.user_pillar()["qborg"]["vms"])
    a_paths = {vm: f"qborg/{vm}" for vm in a_vms}
    b_paths = {vm: f"qborg/{NAME}/{vm}" for vm in B_VMS}
    mark = {lab: f"{lab.tag or 'first'}-round", other: f"{other.tag}-round"}
    # outside both blocks: the user's own lines and the two admin keys
    outside = [l for owner, l in repos.lines_by_block(read_bytes(lab.authorized_keys_path).decode())
               if owner is None and not repos.MARKER_RE.match(l)]
    assert outside[-1].endswith(" qborg-lab-admin-" + other.tag)
    started = time.monotonic()
    for who in (lab, other):
        applied_ok(who, "dom0")  # each machine's policy for its own VMs
    counts = {}
    for round_ in (1, 2):
        if round_ == 2:
            # the first machine's block changes, so its upload runs with the
            # second machine's block beside it
            pillar = lab.user_pillar()
            pillar["qborg"].setdefault("defaults", {})["storage_quota"] = "500M"
            lab.set_pillar(pillar)
        b_before = {vm: repository_files(home, p) for vm, p in b_paths.items()}
        # the first machine applies ...
        result = {q: applied_ok(lab, q) for q in (ADMIN, *a_vms)}
        if round_ == 2:
            assert "uploaded authorized_keys" in json.dumps(result[ADMIN])
        check_blocks(lab, other, outside)
        assert {vm: repository_files(home, p) for vm, p in b_paths.items()} == b_before
        # ... then the second
        a_before = {vm: repository_files(home, p) for vm, p in a_paths.items()}
        result = {q: applied_ok(other, q) for q in (ADMIN, *B_VMS)}
        if round_ == 1:
            assert "uploaded authorized_keys" in json.dumps(result[ADMIN])
        check_blocks(lab, other, outside)
        # every VM of both backs up, each into its own repository
        for who, vms in ((other, B_VMS), (lab, a_vms)):
            for vm in vms:
                seed(who, vm, f"{mark[who]}{round_}.txt")
            if who is lab:  # the second machine's apply and backups left these alone
                assert {vm: repository_files(home, p) for vm, p in a_paths.items()} == a_before
                b_before = {vm: repository_files(home, p) for vm, p in b_paths.items()}
            for vm in vms:
                names, listing = backup(who, vm)
                counts[who, vm] = counts.get((who, vm), len(names) - 1) + 1
                assert len(names) == counts[who, vm] and (who is lab or len(names) == round_), \
                    (who.tag, vm, names)
                assert f"{mark[who]}{round_}.txt" in listing
                assert f"{mark[other if who is lab else lab]}{round_}.txt" not in listing
        # the first machine's backups left the second's repositories alone
        assert {vm: repository_files(home, p) for vm, p in b_paths.items()} == b_before
        check_blocks(lab, other, outside)
        TIMES[f"round {round_}"] = time.monotonic() - started
        started = time.monotonic()
    # each admin qube's status sees its own VMs' archives, and names its installation
    for who, vms, name in ((lab, a_vms, None), (other, B_VMS, NAME)):
        data = json.loads(who.run(ADMIN, ["qborg", "status", "--json"]).stdout)
        assert data["installation"] == name
        assert {e["vm"]: (e["archives"], e["error"]) for e in data["vms"]} == {
            vm: (counts[who, vm], None) for vm in vms}


def test_a_repository_of_the_other_installation_or_a_missing_name_is_refused(lab, two):
    other = two
    text = read_bytes(lab.authorized_keys_path).decode()
    for who, name in ((lab, None), (other, NAME)):
        if not repos.split_managed_block(text, name)[1]:  # run on its own: both blocks first
            applied_ok(who, ADMIN)
    pillar = other.user_pillar()
    original = read_bytes(lab.authorized_keys_path)
    home = lab.home(lab.server_user)
    repositories = repository_files(home, "qborg")  # both installations'

    def refused(qube_pillar, *expected):
        other.set_pillar(qube_pillar)
        for test in (True, False):
            rc, result = other.apply(ADMIN, test=test)
            assert rc != 0 and isinstance(result, dict), (test, result)
            message = "\n".join(failed(result).values())
            for part in expected:
                assert part in message, (test, message)
            assert "nothing was uploaded and nothing was changed on the server" in message
            assert read_bytes(lab.authorized_keys_path) == original
        assert repository_files(home, "qborg") == repositories

    # the second machine's vm-personal set to the first machine's repository
    taken = json.loads(json.dumps(pillar))
    taken["qborg"]["vms"]["vm-personal"] = {
        "repository": f"ssh://{lab.server_user}@127.0.0.1:{lab.port}/./qborg/vm-personal"}
    refused(taken, "qborg:vms:vm-personal:repository: vm-personal's repository "
                   "qborg/vm-personal (of installation lap) is qborg/vm-personal, the "
                   "repository of the key qborg:vm-personal of the installation without a "
                   "name (block '# BEGIN qborg')",
            f"{lab.server_user}@127.0.0.1:{lab.port}'s authorized_keys")
    # the second machine without its name: the first machine's block is not its own
    unnamed = json.loads(json.dumps(pillar))
    del unnamed["qborg"]["installation"]
    refused(unnamed, "qborg:installation: the block '# BEGIN qborg' in "
                     f"{lab.server_user}@127.0.0.1:{lab.port}'s authorized_keys holds keys this "
                     "admin qube never made (qborg:vm-personal",
            "another admin qube uses the same installation name (or none)")
    other.set_pillar(pillar)
    result = applied_ok(other, ADMIN)
    assert read_bytes(lab.authorized_keys_path) == original
    assert "uploaded" not in json.dumps(result)
