"""A lost machine rebuilt from the export and the server, end to end.

The session's lab is the machine that is lost: its dom0 gives vm-personal a
definition of its own (label, memory, a feature, a service, a tag, firewall
rules), dom0's part records it and pushes it to the admin qube, whose export
carries it. A second lab is the new machine: its own dom0 (which has no
vm-personal), a new admin qube and a new, empty vm-personal home; only the
backup server is the first lab's (the remote account survives). There the
admin qube imports the export, `qborg recreate vm-personal` prints the dom0
script, dom0 runs it with the lab's qvm-* tools, and the rebuilt definition
is the one recorded before; then vm-personal, applied, gets its bundle and
restores its home from the server, byte for byte.

Then the attacker: a definition tampered in the admin qube's store is
refused by `qborg recreate`, and a feature value that is a command in
Qubes' eyes only text (``$(...)``, ``;``, quotes) reaches dom0's tools as
that text: the script, run with nothing but the qvm-* tools on its PATH,
runs no other command; a value that starts with "-" reaches them as text,
never as an option, and a name that does is refused.

The second lab's tag: $QBORG_LAB_TAG2, else the session lab's tag and "r"."""

import json
import os
import shutil
import subprocess
import sys
import tempfile

import pytest

from helpers import ADMIN, applied_ok, archives, backup, read_bytes

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "salt", "_modules"))

import qborg_lab  # noqa: E402
import _qborg_dom0 as dom0_mod  # noqa: E402

VM = "vm-personal"
MASTER = "recreate master password 7"
FILE = "Documents/recreate/letter.bin"
SECRET_FILE = os.urandom(4096) + b"the letter\n"
FIREWALL = [["action=accept", "dsthost=example.com", "proto=tcp", "dstports=443"],
            ["action=accept", "dsthost=10.20.0.0/16", "proto=udp", "dstports=5000-5010",
             "comment=office; vpn"],
            ["action=accept", "specialtarget=dns"],
            ["action=drop"]]


def second_tag(first):
    tag = os.environ.get("QBORG_LAB_TAG2") or (first + "r")[:6]
    if tag == first:
        tag = first[:5] + "s"
    return qborg_lab._check_tag(tag)


def dom0(lab, *argv, check=True, path=None):
    """A qvm-* tool (or sh) run as the lab's dom0."""
    env = {k: v for k, v in os.environ.items() if k != "QBORG_LAB_QUBE"}
    env["PATH"] = path or f"{lab.bin_dir}:/usr/bin:/bin"
    proc = subprocess.run(list(argv), env=env, capture_output=True, text=True, check=False,
                          stdin=subprocess.DEVNULL)
    if check:
        assert proc.returncode == 0, (argv, proc.stdout, proc.stderr)
    return proc


def recorded(lab, vm):
    """vm's definition as dom0's part records it, in that lab's dom0."""
    env = {k: v for k, v in os.environ.items() if k != "QBORG_LAB_QUBE"}
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env, PATH=f"{lab.bin_dir}:/usr/bin:/bin")
        return dom0_mod.qube_definition(vm)
    finally:
        os.environ.clear()
        os.environ.update(saved)


def shape_vm_personal(lab):
    """vm-personal as a user shapes it in dom0."""
    dom0(lab, "qvm-prefs", VM, "label", "blue")
    dom0(lab, "qvm-prefs", VM, "memory", "600")
    dom0(lab, "qvm-prefs", VM, "maxmem", "3000")
    dom0(lab, "qvm-prefs", VM, "include_in_backups", "False")
    dom0(lab, "qvm-features", VM, "gui-allow-fullscreen", "1")
    dom0(lab, "qvm-service", VM, "cups", "on")
    dom0(lab, "qvm-tags", VM, "add", "personal")
    for rule in FIREWALL:
        dom0(lab, "qvm-firewall", VM, "add", *rule)
    dom0(lab, "qvm-firewall", VM, "del", "--rule-no", "0")


@pytest.fixture(scope="module")
def lost(lab):
    """The first machine, applied, vm-personal shaped and backed up, the
    export written. Afterwards vm-personal's dom0 record as it was, and dom0
    applied again."""
    saved = lab.dom0_qube(VM)
    workdir = tempfile.mkdtemp(prefix="qborg-recreate-", dir="/var/tmp")
    try:
        applied_ok(lab, "dom0")
        applied_ok(lab, ADMIN)
        applied_ok(lab, VM)
        shape_vm_personal(lab)
        target = os.path.join(lab.home(VM), FILE)
        lab.run(VM, ["mkdir", "-p", os.path.dirname(target)])
        with open(target, "wb") as f:
            f.write(SECRET_FILE)
        home = os.stat(lab.home(VM))
        os.chown(target, home.st_uid, home.st_gid)
        backup(lab, VM)
        result = applied_ok(lab, "dom0")  # records the shaped definition, pushes it
        pushed = [v for v in result.values() if v["__id__"] == "qborg-dom0-admin-settings"][0]
        assert pushed["changes"] == {"settings": "pushed"}, pushed
        export = os.path.join(lab.home(ADMIN), "qborg-recreate.kdbx")
        proc = lab.run(ADMIN, ["qborg", "export", export, "--password-fd", "0"], check=False,
                       input=MASTER + "\n")
        assert proc.returncode == 0 and "qube definitions" in proc.stdout, proc.stderr
        kept = os.path.join(workdir, "qborg.kdbx")
        shutil.copy(export, kept)
        os.unlink(export)
        yield {"definition": recorded(lab, VM), "export": kept, "archives": archives(lab, VM)}
    finally:
        lab._edit_dom0_qubes(lambda data: data["qubes"].update({VM: saved}))
        applied_ok(lab, "dom0")
        shutil.rmtree(workdir, ignore_errors=True)


def test_dom0_records_the_definition_and_pushes_it_again_when_it_changes(lab, lost):
    definition = lost["definition"]
    assert definition["label"] == "blue"
    assert definition["properties"] == {"include_in_backups": "False", "maxmem": "3000",
                                        "memory": "600"}
    assert definition["features"] == {"gui-allow-fullscreen": "1", "service.crond": "1",
                                      "service.cups": "1"}
    assert definition["tags"] == ["personal"]
    assert definition["firewall"] == [
        {"action": "accept", "dsthost": "example.com", "proto": "tcp", "dstports": "443"},
        {"action": "accept", "dsthost": "10.20.0.0/16", "proto": "udp",
         "dstports": "5000-5010", "comment": "office; vpn"},
        {"action": "accept", "specialtarget": "dns"}, {"action": "drop"}]
    stored = os.path.join(lab.prefix(ADMIN), "etc", "qborg", "qubes.json")
    with open(stored, encoding="utf-8") as f:
        assert json.load(f)[VM] == definition
    assert oct(os.stat(stored).st_mode & 0o777) == "0o644"
    # unchanged: nothing pushed; test=True changes nothing; a new label is pushed
    result = applied_ok(lab, "dom0")
    assert [v["__id__"] for v in result.values() if v["changes"]] == []
    dom0(lab, "qvm-prefs", VM, "label", "purple")
    try:
        before = read_bytes(stored)
        result = applied_ok(lab, "dom0", test=True)
        assert read_bytes(stored) == before
        result = applied_ok(lab, "dom0")
        assert [v["__id__"] for v in result.values() if v["changes"]] == \
            ["qborg-dom0-admin-settings"]
        with open(stored, encoding="utf-8") as f:
            assert json.load(f)[VM]["label"] == "purple"
    finally:
        dom0(lab, "qvm-prefs", VM, "label", "blue")
        applied_ok(lab, "dom0")


@pytest.fixture(scope="module")
def new_machine(lab, lost):
    """The second lab: dom0 without vm-personal, a new admin qube without a
    key, the first lab's server; the export imported."""
    directory = tempfile.mkdtemp(prefix="qborg-lab-", dir="/var/tmp")
    other = qborg_lab.Lab(directory=directory, tag=second_tag(lab.tag))
    try:
        other.up()
        other.use_server(lab)
        # the same pillar as the lost machine's (a copy the user kept, or the
        # export's settings entry): the admin qube's upload then keeps the
        # account's authorized_keys as it is
        other.set_pillar(lab.user_pillar())
        dom0(other, "qvm-remove", "--force", VM)  # the lost qube
        # the user makes the admin qube by hand, with the service its
        # maintenance schedule needs (dom0's part cannot run yet)
        dom0(other, "qvm-service", "--enable", ADMIN, "crond")
        for path in (other.admin_key_path, other.admin_key_path + ".pub"):
            os.unlink(path)  # the new admin qube has no key yet: it comes with the export
        rc, _result = other.apply(ADMIN)  # installs `qborg`; provisioning fails, nothing made
        assert rc != 0 and not os.path.exists(other.admin_key_path)
        export = os.path.join(other.home(ADMIN), "qborg.kdbx")
        shutil.copy(lost["export"], export)
        os.chown(export, *(lambda e: (e.st_uid, e.st_gid))(os.stat(other.home(ADMIN))))
        proc = other.run(ADMIN, ["qborg", "import", export, "--password-fd", "0"], check=False,
                         input=MASTER + "\n")
        assert proc.returncode == 0 and f"definition of {VM}" in proc.stdout, \
            proc.stdout + proc.stderr
        applied_ok(other, ADMIN)
        yield other
    finally:
        other.down()
        shutil.rmtree(directory, ignore_errors=True)


def recreate(lab, *vms):
    proc = lab.run(ADMIN, ["qborg", "recreate", *vms], check=False)
    return proc


def test_recreate_rebuilds_the_definition_and_the_home_comes_back(lab, lost, new_machine):
    other = new_machine
    assert dom0(other, "qvm-check", VM, check=False).returncode == 1
    proc = recreate(other, VM)
    assert proc.returncode == 0, proc.stderr
    script = os.path.join(other.dir, "recreate.sh")
    with open(script, "w", encoding="utf-8") as f:
        f.write(proc.stdout)
    ran = dom0(other, "sh", script)
    assert f"recreated {VM}" in ran.stdout
    assert recorded(other, VM) == lost["definition"]
    # the script refuses to touch a qube that exists
    again = dom0(other, "sh", script, check=False)
    assert again.returncode == 1 and f"{VM} exists already" in again.stderr
    assert recorded(other, VM) == lost["definition"]
    # then the home: dom0's part (policy, crond), the VM's bundle, the restore
    applied_ok(other, "dom0")
    applied_ok(other, VM)
    assert lost["archives"][-1] in archives(other, VM)
    assert not os.path.exists(os.path.join(other.home(VM), FILE))  # a new, empty home
    restore = os.path.join(other.home(VM), "restore")
    inner = os.path.join(lab.home(VM), FILE).lstrip("/")  # the path in the lost VM's archive
    other.run(VM, ["mkdir", "-p", restore])
    other.run(VM, ["sh", "-c", 'cd "$1" && borgbak extract "$2" "$3"', "sh", restore,
                   lost["archives"][-1], inner])
    assert read_bytes(os.path.join(restore, inner)) == SECRET_FILE


def only_qvm_path(lab, root):
    """A directory with nothing but the lab's qvm-* tools (and their qubesd.py)."""
    tools = os.path.join(root, "only-qvm")
    os.makedirs(tools, exist_ok=True)
    for name in os.listdir(lab.bin_dir):
        if name.startswith("qvm-") or name == "qubesd.py":
            target = os.path.join(tools, name)
            if not os.path.exists(target):
                os.symlink(os.path.join(lab.bin_dir, name), target)
    return tools


@pytest.mark.parametrize("field, value", [
    ("label", "blue$(touch /tmp/qborg-pwned)"),
    ("template", "debian-12-xfce; touch /tmp/qborg-pwned"),
    ("properties", {"memory": "600\nqvm-remove -f sys-net"}),
    ("properties", {"kernelopts": "x' ; touch /tmp/qborg-pwned; '"}),  # quoted, but fine
    ("properties", {"kernelopts": "--help -D"}),  # after "--": text, never an option
    ("features", {"--unset": "1"}),  # a name that could pass for an option
    ("tags", ["--help"]),
    ("tags", ["personal`touch /tmp/qborg-pwned`"]),
    ("features", {"x;touch /tmp/qborg-pwned": "1"}),
    ("firewall", [{"action": "accept", "dsthost": "$(touch /tmp/qborg-pwned)"}]),
    ("firewall", [{"action": "accept", "comment": "a\"b"}]),
])
def test_a_tampered_definition_is_refused_or_stays_text(lab, lost, new_machine, field, value):
    other = new_machine
    stored = os.path.join(other.prefix(ADMIN), "etc", "qborg", "qubes.json")
    original = read_bytes(stored)
    definitions = json.loads(original)
    tampered = dict(definitions[VM], **{field: value})
    if field == "properties" and "kernelopts" in value:
        tampered["properties"] = dict(definitions[VM]["properties"], **value)
    with open(stored, "w", encoding="utf-8") as f:  # the admin qube's user can do this
        json.dump({"vm-tampered": tampered}, f)
    marker = "/tmp/qborg-pwned"
    try:
        proc = recreate(other, "vm-tampered")
        if "kernelopts" in json.dumps(value):
            # a value qubesd takes as it is: quoted, it reaches qvm-prefs as text
            assert proc.returncode == 0, proc.stderr
            script = os.path.join(other.dir, "tampered.sh")
            with open(script, "w", encoding="utf-8") as f:
                f.write(proc.stdout)
            tools = only_qvm_path(other, other.dir)
            dom0(other, "/bin/sh", script, path=tools)
            assert not os.path.exists(marker)
            with open(os.path.join(other.dir, "qubes", "dom0", "qubes.json")) as f:
                entry = json.load(f)["qubes"]["vm-tampered"]
            assert entry["prefs"]["kernelopts"] == value["kernelopts"]
            dom0(other, "qvm-remove", "--force", "vm-tampered")
        else:
            assert proc.returncode == 1 and "refused" in proc.stderr, proc.stdout + proc.stderr
            assert f"qube_definitions:vm-tampered:{field}" in proc.stderr, proc.stderr
            assert proc.stdout == ""
        assert not os.path.exists(marker)
    finally:
        with open(stored, "wb") as f:
            f.write(original)
        if os.path.exists(marker):
            os.unlink(marker)
