"""A highstate leaves qborg out of every qube it was not applied to.

`qubesctl --targets=QUBE state.highstate` (or `--all`) applies whatever the
enabled tops give QUBE: Qubes' /srv/salt/top.sls (qubes-mgmt-salt-base-topd)
merges every top enabled with `qubesctl top.enable NAME`. qborg ships no
state top (`state.apply qborg` needs none), so even a user who enabled every
top it ships gets none of qborg's states in an AppVM its pillar does not
name or in a template it does not list: nothing there changes.

The lab runs the highstate as qubesctl runs it for a qube, through a real
`salt-ssh -w` from dom0's staged /srv (Lab.salt_ssh_command), with a
stand-in for topd's top.sls: the union of the targets of the enabled tops,
which are every `.top` qborg's /srv carries under salt/ and the top of a
formula of the user's own that targets every qube (so the highstate has
something to run and shows it ran).
"""

import json
import os
import stat
import subprocess

import pytest

UNRELATED = "vm-other"   # an AppVM that qborg's pillar does not name
TEMPLATE = "tpl-other"   # a template that qborg:templates does not list
OTHER_FORMULA = "lab-other"  # the user's own formula, in every qube's highstate

# topd's top.sls, as the lab stands it in: the enabled tops (rendered with
# the target's grains and pillar, as Salt renders a top), their targets merged
TOPD_STAND_IN = """\
{#- the lab's stand-in for Qubes' top.sls (qubes-mgmt-salt-base-topd) #}
{%- set merged = {} %}
{%- for path in ENABLED %}
{%- set text %}{% include path %}{% endset %}
{%- for env, targets in ((text | load_yaml) or {}).items() %}
{%- for target, states in targets.items() %}
{%- set have = merged.setdefault(env, {}).setdefault(target, []) %}
{%- for state in states if state not in have %}
{%- do have.append(state) %}
{%- endfor %}
{%- endfor %}
{%- endfor %}
{%- endfor %}
{{ merged | json }}
"""

# what qborg's init.top was before it was dropped: every qube got qborg
EVERY_QUBE_GETS_QBORG = "base:\n  '*':\n    - qborg\n"


def _write(path, text):
    os.makedirs(os.path.dirname(path), mode=0o750, exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(path, 0o640)


def shipped_tops(srv):
    """Every state top dom0's /srv carries (relative salt paths), the ones a
    user could `qubesctl top.enable`."""
    salt = os.path.join(srv, "salt")
    found = []
    for root, dirs, files in os.walk(salt):
        dirs.sort()
        found += [os.path.relpath(os.path.join(root, name), salt)
                  for name in sorted(files) if name.endswith(".top")]
    return found


def highstate_ssh(lab, qube, extra_tops=None):
    """`qubesctl --skip-dom0 --targets=QUBE state.highstate` in the lab: every
    top of dom0's staged /srv enabled, the user's own formula's and
    EXTRA_TOPS ({name: text}) too. Returns (rc, results, enabled tops)."""
    argv, env = lab.salt_ssh_command(qube, "--out=json", "state.highstate")
    srv = lab.srv_dir()
    enabled = shipped_tops(srv)
    salt = os.path.join(srv, "salt")
    _write(os.path.join(salt, OTHER_FORMULA, "init.sls"),
           "%s-ran:\n  test.succeed_without_changes\n" % OTHER_FORMULA)
    _write(os.path.join(salt, OTHER_FORMULA, "init.top"),
           "base:\n  '*':\n    - %s\n" % OTHER_FORMULA)
    enabled.append(OTHER_FORMULA + "/init.top")
    for name, text in sorted((extra_tops or {}).items()):
        _write(os.path.join(salt, "_lab_tops", name + ".top"), text)
        enabled.append("_lab_tops/%s.top" % name)
    _write(os.path.join(salt, "top.sls"),
           "{%%- set ENABLED = %s %%}\n" % json.dumps(enabled) + TOPD_STAND_IN)
    proc = subprocess.run(argv, env=env, stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, check=False)
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        pytest.fail("salt-ssh state.highstate %s: %s" % (qube, proc.stdout[-2000:]
                                                         + proc.stderr[-2000:]))
    return proc.returncode, data.get(qube, data), enabled


def tree(path):
    """{relative path: (type, mode, owner, size, mtime, content)} under PATH."""
    found = {}
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            full = os.path.join(root, name)
            info = os.lstat(full)
            content = None
            if stat.S_ISREG(info.st_mode):
                with open(full, "rb") as handle:
                    content = handle.read()
            found[os.path.relpath(full, path)] = (
                stat.S_IFMT(info.st_mode), stat.S_IMODE(info.st_mode), info.st_uid,
                info.st_size, info.st_mtime_ns, content)
    return found


def snapshot(lab, qube):
    """What qborg's parts write in a qube (its home, its /usr/local, its
    user's crontab) and dom0's record of it (its features: crond)."""
    crontab = lab.run(qube, ["crontab", "-l"], check=False)
    return {"home": tree(lab.home(qube)), "prefix": tree(lab.prefix(qube)),
            "crontab": (crontab.returncode, crontab.stdout),
            "dom0": lab.dom0_qube(qube)}


def sls_of(results):
    return {value["__sls__"] for value in results.values()}


@pytest.fixture(scope="module")
def others(lab):
    """An AppVM and a template that qborg's pillar does not name."""
    pillar = lab.user_pillar()["qborg"]
    assert UNRELATED not in (pillar.get("vms") or {})
    assert TEMPLATE not in (pillar.get("templates") or [])
    assert TEMPLATE != pillar.get("admin_template")
    lab.add_qube(UNRELATED)
    lab.add_qube(TEMPLATE)
    lab.register_qube(TEMPLATE, netvm=None, klass="TemplateVM")
    try:
        assert lab.qubes_pillar(TEMPLATE)["type"] == "template"
        yield (UNRELATED, TEMPLATE)
    finally:
        lab.remove_qube(TEMPLATE)
        lab.remove_qube(UNRELATED)


@pytest.mark.parametrize("qube", [UNRELATED, TEMPLATE])
def test_a_highstate_of_a_qube_qborg_does_not_name_changes_nothing_there(lab, others, qube):
    before = snapshot(lab, qube)
    rc, results, enabled = highstate_ssh(lab, qube)
    assert rc == 0 and isinstance(results, dict), (rc, results)
    # the highstate ran (the user's own formula), and nothing of qborg's
    assert sls_of(results) == {OTHER_FORMULA}, (enabled, results)
    assert not any(path.startswith("qborg/") for path in enabled), enabled
    assert snapshot(lab, qube) == before


def test_the_check_sees_qborg_when_a_top_gives_it_to_every_qube(lab, others):
    """The check above can fail: with a top like the one qborg shipped before
    (`'*': [qborg]`, enabled with `qubesctl top.enable qborg`), the unrelated
    qube's highstate renders qborg's dispatch (its no-op for a qube with no
    role); a template's would install packages."""
    rc, results, _enabled = highstate_ssh(lab, UNRELATED,
                                          extra_tops={"old-qborg": EVERY_QUBE_GETS_QBORG})
    assert rc == 0 and isinstance(results, dict), (rc, results)
    assert sls_of(results) == {OTHER_FORMULA, "qborg"}, results
