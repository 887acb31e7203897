"""`make dist`: the tarball unpacked as the README says over a /srv laid out
as Qubes keeps it (/srv/salt and /srv/pillar 0750, files 0640), with the
pillar example in place and the pillar top enabled, widens no mode there and
renders qborg for every kind of qube with a real `salt-call --local`;
qborg ships no state top, so a highstate finds nothing of it;
`saltutil.sync_all` picks up the modules; and the RPM spec builds a package
with the same files and modes."""

import glob
import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SALT_CALL = os.path.join(os.path.dirname(sys.executable), "salt-call")
CORE = sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "salt", "_modules",
                                                          "_qborg_*.py")))
PART_PREFIXES = ("qborg-dom0-", "qborg-admin-", "qborg-client-", "qborg-template-",
                 "qborg-relay-")
# what Qubes keeps under /srv/salt and /srv/pillar (qubes-mgmt-salt-base-config:
# qubes/directories.sls)
QUBES_DIR_MODE = 0o750
QUBES_FILE_MODE = 0o640


def formula_version():
    with open(os.path.join(REPO, "FORMULA"), encoding="utf-8") as handle:
        return next(line.split(":", 1)[1].strip() for line in handle
                    if line.startswith("version:"))


@pytest.fixture(scope="module")
def dist(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(["make", "-s", "dist", "DIST=%s" % out], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


# Qubes' top files (qubes-mgmt-salt-base-topd) merge the tops enabled with
# `qubesctl top.enable`: here, for pillar, only qborg's (`top.enable qborg
# pillar=True`), and no state top of qborg's, since it ships none
QUBES_FILES = {
    "salt/top.sls": "# Qubes' own: no state top enabled\n{}\n",
    "salt/_modules/qubes_own.py": "# Qubes' own module\n",
    "pillar/top.sls": "# Qubes' own: the enabled pillar tops\n{% include 'qborg/init.top' %}\n",
}


def qubes_srv(root):
    """ROOT laid out as dom0's /srv in Qubes: salt and pillar 0750, with files
    of Qubes' own at 0640 (the tops, a module beside where qborg's go)."""
    root.mkdir()
    for sub in ("salt", "salt/_modules", "pillar"):
        (root / sub).mkdir()
        os.chmod(root / sub, QUBES_DIR_MODE)
    for name, text in QUBES_FILES.items():
        (root / name).write_text(text)
        os.chmod(root / name, QUBES_FILE_MODE)
    return root


def unpack(tarball, root):
    """`sudo tar -xzf qborg-VERSION.tar.gz -C /srv`, as the README says (root
    restores each member's mode as it is in the tarball)."""
    subprocess.run(["tar", "-xzf", str(tarball), "-C", str(root)], check=True)


def modes(root):
    """{path relative to ROOT: (is a directory, permission bits)} of the tree."""
    found = {}
    for path in [root, *root.rglob("*")]:
        info = os.lstat(path)
        assert stat.S_ISDIR(info.st_mode) or stat.S_ISREG(info.st_mode), path
        found[str(path.relative_to(root))] = (stat.S_ISDIR(info.st_mode),
                                              stat.S_IMODE(info.st_mode))
    return found


@pytest.fixture(scope="module")
def srv(dist, tmp_path_factory):
    """The tarball unpacked over a /srv as Qubes keeps it, as the README says:
    `tar -xzf qborg-VERSION.tar.gz -C /srv`, the pillar example copied to
    init.sls (`cp -n`, which keeps the example's mode)."""
    root = qubes_srv(tmp_path_factory.mktemp("dom0") / "srv")
    unpack(dist / ("qborg-%s.tar.gz" % formula_version()), root)
    shutil.copy(root / "pillar" / "qborg" / "init.sls.example",
                root / "pillar" / "qborg" / "init.sls")
    return root


def minion_config(srv, tmp_path, minion_id, root_dir=None):
    """A dom0-like salt-call --local: /srv/salt and /srv/pillar with their
    top.sls (QUBES_FILES: qborg's pillar top enabled, as `qubesctl
    top.enable qborg pillar=True` does)."""
    conf = tmp_path / ("conf-" + minion_id)
    conf.mkdir(exist_ok=True)
    config = {
        "id": minion_id,
        "file_client": "local",
        "root_dir": str(root_dir or tmp_path / ("root-" + minion_id)),
        "file_roots": {"base": [str(srv / "salt")]},
        "pillar_roots": {"base": [str(srv / "pillar")]},
        "log_file": str(tmp_path / ("minion-%s.log" % minion_id)),
        "enable_fqdns_grains": False,
    }
    (conf / "minion").write_text(json.dumps(config))
    return conf


def salt_call(conf, *args):
    proc = subprocess.run([SALT_CALL, "--local", "-c", str(conf), "--out=json", *args],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout)["local"]


def test_the_tarball_lays_out_srv_with_regular_files_only(dist, srv):
    version = formula_version()
    assert sorted(os.listdir(dist)) == ["qborg-%s.tar.gz" % version, "qborg.spec"]
    with tarfile.open(dist / ("qborg-%s.tar.gz" % version)) as tar:
        members = tar.getmembers()
    assert all(m.isfile() or m.isdir() for m in members)  # no symlink, no device
    assert all(m.uid == 0 and m.gid == 0 for m in members)
    files = {m.name for m in members if m.isfile()}
    expected = {"salt/qborg/init.sls", "salt/qborg/map.jinja",
                "salt/qborg/defaults.yaml", "salt/_modules/qborg.py", "salt/_states/qborg.py",
                "pillar/qborg/init.top", "pillar/qborg/init.sls.example"}
    expected |= {"salt/_modules/" + name for name in CORE}
    assert len(CORE) >= 10 and expected <= files
    assert all(name.startswith(("salt/qborg/", "salt/_modules/", "salt/_states/",
                                "pillar/qborg/")) for name in files)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in files)
    # no state top: a highstate never applies qborg (only the pillar's top)
    assert [name for name in files if name.endswith(".top")] == ["pillar/qborg/init.top"]
    # the core beside the execution module is the source tree's
    for name in CORE:
        shipped = (srv / "salt" / "_modules" / name).read_bytes()
        with open(os.path.join(REPO, "salt", "_modules", name), "rb") as handle:
            assert shipped == handle.read()
    # the pillar shipped is the documented example
    with open(os.path.join(REPO, "pillar.example"), "rb") as handle:
        assert (srv / "pillar" / "qborg" / "init.sls.example").read_bytes() == handle.read()


def test_make_dist_is_reproducible(dist, tmp_path):
    again = tmp_path / "again"
    proc = subprocess.run(["make", "-s", "dist", "DIST=%s" % again], cwd=REPO,
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    name = "qborg-%s.tar.gz" % formula_version()
    assert (again / name).read_bytes() == (dist / name).read_bytes()


def test_the_members_carry_qubes_modes_and_no_entry_for_salt_or_pillar(dist):
    with tarfile.open(dist / ("qborg-%s.tar.gz" % formula_version())) as tar:
        members = tar.getmembers()
    assert not {m.name.rstrip("/") for m in members} & {"salt", "pillar", ".", ""}
    assert {m.mode for m in members if m.isdir()} == {QUBES_DIR_MODE}
    assert {m.mode for m in members if m.isfile()} == {QUBES_FILE_MODE}


def test_unpacking_over_qubes_srv_widens_nothing(dist, tmp_path):
    """As the README says, over /srv as Qubes keeps it, and once more (an
    upgrade): no directory wider than 0750, no file wider than 0640, /srv/salt
    and /srv/pillar and Qubes' own files as they were; what salt reads (as
    root) is its owner's to read."""
    tarball = dist / ("qborg-%s.tar.gz" % formula_version())
    root = qubes_srv(tmp_path / "srv")
    before = modes(root)
    for _ in range(2):
        unpack(tarball, root)
        after = modes(root)
        assert {path: after[path] for path in before} == before
        too_wide = {path: oct(mode) for path, (is_dir, mode) in after.items()
                    if path != "." and mode & ~(QUBES_DIR_MODE if is_dir else QUBES_FILE_MODE)}
        assert too_wide == {}
        unreadable = {path for path, (is_dir, mode) in after.items()
                      if mode & (0o700 if is_dir else 0o600) != (0o700 if is_dir else 0o600)}
        assert unreadable == set()
    assert (root / "salt" / "qborg" / "init.sls").is_file()
    if os.geteuid() == 0:  # the README's `sudo tar`: root's owner restored
        assert {os.lstat(p).st_uid for p in root.rglob("*")} == {0}


def test_only_the_pillar_top_is_there_and_highstate_finds_no_qborg(srv, tmp_path):
    """qborg's pillar top gives every qube the settings; qborg ships no state
    top, so a highstate of any qube (dom0's own included) lists no qborg."""
    for minion_id in ("dom0", "vm-personal", "backup-admin", "sys-net", "debian-12-xfce"):
        conf = minion_config(srv, tmp_path, minion_id)
        assert salt_call(conf, "state.show_top") == {}
    # read through a template: salt 3008 masks pillar values on the command line
    admin_vm = salt_call(conf, "slsutil.renderer", "string={{ pillar.qborg.admin_vm }}",
                         "default_renderer=jinja")
    assert admin_vm == "backup-admin"
    assert set(salt_call(conf, "pillar.keys", "qborg:vms")) == {"vm-personal", "vm-work",
                                                                 "vm-vault"}


@pytest.fixture(scope="module")
def synced_root(srv, tmp_path_factory):
    """Salt's root (cache) after `qubesctl saltutil.sync_all`, the install
    step that brings qborg's modules into the cache."""
    tmp = tmp_path_factory.mktemp("synced")
    salt_call(minion_config(srv, tmp, "dom0", root_dir=tmp / "root"), "saltutil.sync_all")
    return tmp / "root"


@pytest.mark.parametrize("minion_id,extra,prefix", [
    ("dom0", [], "qborg-dom0-"),
    ("backup-admin", [], "qborg-admin-"),
    ("vm-personal", [], "qborg-client-"),
    ("sys-qborg-relay", [], "qborg-relay-"),
    # what Qubes' own pillar module says of a template
    ("debian-12-xfce", ['pillar={"qubes": {"type": "template"}}'], "qborg-template-"),
    ("sys-net", [], None),
])
def test_each_role_renders_from_the_unpacked_tree(srv, synced_root, tmp_path, minion_id,
                                                 extra, prefix):
    conf = minion_config(srv, tmp_path, minion_id, root_dir=synced_root)
    high = salt_call(conf, "state.show_sls", "qborg", *extra)
    assert isinstance(high, dict) and high, high  # a list is Salt's render errors
    if prefix:
        assert all(state_id.startswith(prefix) for state_id in high), sorted(high)
    else:
        assert not any(state_id.startswith(PART_PREFIXES) for state_id in high), sorted(high)


def test_sync_all_picks_up_the_modules_and_the_core_beside_them(srv, tmp_path):
    conf = minion_config(srv, tmp_path, "vm-personal")
    synced = salt_call(conf, "saltutil.sync_all")
    assert "modules.qborg" in synced["modules"]
    assert "states.qborg" in synced["states"]
    assert not synced.get("utils")
    extmods = tmp_path / "root-vm-personal" / "var" / "cache" / "salt" / "minion" / "extmods"
    assert set(CORE) <= set(os.listdir(extmods / "modules"))
    example = yaml.safe_load((srv / "pillar" / "qborg" / "init.sls").read_text())["qborg"]
    assert salt_call(conf, "qborg.client_context", json.dumps(example))["valid"] is True
    assert salt_call(conf, "sys.list_state_functions", "qborg")


def test_the_rpm_spec_builds_a_package_with_the_same_files(dist, srv, tmp_path):
    rpmbuild = shutil.which("rpmbuild")
    assert rpmbuild, "rpmbuild is missing: `make deps` installs Debian's rpm package"
    proc = subprocess.run(
        [rpmbuild, "-bb", "--define", "_topdir %s" % (tmp_path / "rpmbuild"),
         "--define", "_sourcedir %s" % dist, "--define", "_rpmdir %s" % (tmp_path / "rpms"),
         str(dist / "qborg.spec")],
        capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    packages = list((tmp_path / "rpms").rglob("*.rpm"))
    assert [p.name for p in packages] == ["qborg-%s-1.noarch.rpm" % formula_version()]
    listing = subprocess.run(["rpm", "-qlp", str(packages[0])], capture_output=True,
                             text=True, check=True).stdout.split()
    shipped = {"/srv/" + str(p.relative_to(srv)) for p in srv.rglob("*")
               if p.is_file() and str(p.relative_to(srv)) not in QUBES_FILES}
    assert shipped <= set(listing)
    configs = subprocess.run(["rpm", "-qcp", str(packages[0])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert configs == ["/srv/pillar/qborg/init.sls"]
    # Qubes' modes, and /srv, /srv/salt and /srv/pillar left to Qubes
    perms = dict(line.split(" ", 1)[::-1] for line in subprocess.run(
        ["rpm", "-qp", "--queryformat", "[%{FILEMODES:perms} %{FILENAMES}\n]",
         str(packages[0])], capture_output=True, text=True, check=True).stdout.splitlines())
    assert not {"/srv", "/srv/salt", "/srv/pillar"} & set(perms)
    assert {mode for mode in perms.values() if mode.startswith("d")} == {"drwxr-x---"}
    assert {mode for mode in perms.values() if not mode.startswith("d")} == {"-rw-r-----"}
