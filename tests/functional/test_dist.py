"""`make dist`: the tarball unpacked into an empty tree laid out like dom0's
/srv, with the pillar example in place and the pillar top enabled, renders
qborg for every kind of qube with a real `salt-call --local`; qborg ships no
state top, so a highstate finds nothing of it; `saltutil.sync_all` picks up
the modules; and the RPM spec builds a package with the same files."""

import json
import os
import shutil
import subprocess
import sys
import tarfile

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SALT_CALL = os.path.join(os.path.dirname(sys.executable), "salt-call")
CORE = ("qborg_core", "qborg_admin", "qborg_maint")
PART_PREFIXES = ("qborg-dom0-", "qborg-admin-", "qborg-client-", "qborg-template-",
                 "qborg-relay-")


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


@pytest.fixture(scope="module")
def srv(dist, tmp_path_factory):
    """The tarball unpacked into an empty /srv, as the README says:
    `tar -xzf qborg-VERSION.tar.gz -C /srv`, the pillar example copied to
    init.sls."""
    root = tmp_path_factory.mktemp("dom0") / "srv"
    root.mkdir()
    subprocess.run(["tar", "-xzf", str(dist / ("qborg-%s.tar.gz" % formula_version())),
                    "-C", str(root)], check=True)
    shutil.copy(root / "pillar" / "qborg" / "init.sls.example",
                root / "pillar" / "qborg" / "init.sls")
    # Qubes' pillar top (qubes-mgmt-salt-base-topd) merges the tops enabled
    # with `qubesctl top.enable`: here qborg's (`top.enable qborg pillar=True`)
    (root / "pillar" / "top.sls").write_text("{% include 'qborg/init.top' %}\n")
    return root


def minion_config(srv, tmp_path, minion_id, root_dir=None):
    """A dom0-like salt-call --local: /srv/salt and /srv/pillar with their
    top.sls (qborg's pillar top enabled, as `qubesctl top.enable qborg
    pillar=True` does)."""
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
    for module in CORE:
        expected |= {"salt/_utils/%s.py" % module, "salt/_modules/_%s.py" % module}
    expected.add("salt/_utils/qborg_relay.py")  # the relay qube's part installs it
    assert expected <= files
    assert all(name.startswith(("salt/qborg/", "salt/_modules/", "salt/_states/",
                                "salt/_utils/", "pillar/qborg/")) for name in files)
    assert not any("__pycache__" in name or name.endswith(".pyc") for name in files)
    # no state top: a highstate never applies qborg (only the pillar's top)
    assert [name for name in files if name.endswith(".top")] == ["pillar/qborg/init.top"]
    # the copies beside the execution module are the core itself
    for module in CORE:
        shipped = (srv / "salt" / "_modules" / ("_%s.py" % module)).read_bytes()
        assert shipped == (srv / "salt" / "_utils" / ("%s.py" % module)).read_bytes()
        with open(os.path.join(REPO, "salt", "_utils", module + ".py"), "rb") as handle:
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


def test_sync_all_picks_up_the_modules_and_they_load_without_utils(srv, tmp_path):
    conf = minion_config(srv, tmp_path, "vm-personal")
    synced = salt_call(conf, "saltutil.sync_all")
    assert "modules.qborg" in synced["modules"]
    assert "states.qborg" in synced["states"]
    assert {"utils.%s" % m for m in CORE} <= set(synced["utils"])
    extmods = tmp_path / "root-vm-personal" / "var" / "cache" / "salt" / "minion" / "extmods"
    assert {"_%s.py" % m for m in CORE} <= set(os.listdir(extmods / "modules"))
    example = yaml.safe_load((srv / "pillar" / "qborg" / "init.sls").read_text())["qborg"]
    assert salt_call(conf, "qborg.minion_role", json.dumps(example)) == "client"
    # as salt-ssh ships them to a qube's loader: _modules and _states, no _utils
    shutil.rmtree(extmods / "utils")
    assert salt_call(conf, "qborg.minion_role", json.dumps(example)) == "client"
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
               if p.is_file() and p != srv / "pillar" / "top.sls"}  # Qubes' own
    assert shipped <= set(listing)
    configs = subprocess.run(["rpm", "-qcp", str(packages[0])], capture_output=True,
                             text=True, check=True).stdout.split()
    assert configs == ["/srv/pillar/qborg/init.sls"]
