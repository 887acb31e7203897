"""End-to-end tests run against the lab (lab/qborg_lab.py): real sshd, real users.

They need root. Without it they fail (not skip), so a CI that lost its root
does not turn green by running nothing.

QBORG_LAB_TAG=T runs them in a lab whose unix users are T-backup-admin, ...,
T-qborg-srv (owner record /etc/qborg-lab/owner-T), beside the untagged lab and labs with
other tags: several runs at once on one host, one per tag.
"""

import os
import pwd
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "lab"))

import qborg_lab  # noqa: E402
from qborg_lab import Lab  # noqa: E402

NEED_ROOT = ("the e2e tests need root: the lab creates unix users, a qrexec broker "
             "and an sshd (run them as root, e.g. in CI or a throwaway VM)")


@pytest.fixture(scope="session", autouse=True)
def _e2e_needs_root():
    if os.geteuid() != 0:
        pytest.fail(NEED_ROOT, pytrace=False)


def _leftovers(lab):
    """What down() must not leave behind (of this lab's tag)."""
    problems = []
    for name in (qborg_lab.sshd_config_name(lab.tag), qborg_lab.qubes_sshd_config_name(lab.tag),
                 qborg_lab.server2_config_name(lab.tag)):
        for pid, config in qborg_lab._lab_sshd_pids(lab.tag, name).items():
            if config.startswith(lab.dir + os.sep):
                problems.append("sshd %d (%s) still running" % (pid, name))
    for name in list(lab.USERS.values()) + [lab.server_user, lab.server2_user]:
        if not name:
            continue
        try:
            pwd.getpwnam(name)
            problems.append("user %s still exists" % name)
        except KeyError:
            pass
        if os.path.exists("/home/" + name):
            problems.append("/home/%s still exists" % name)
    for path in (lab.sudoers_path, lab.owner_record_path):
        if os.path.exists(path):
            problems.append("%s still exists" % path)
    for pid, directory in qborg_lab._lab_broker_pids().items():
        if directory == lab.dir:
            problems.append("qrexec broker %d still running" % pid)
    if os.path.exists(lab.dir):
        problems.append("%s still exists" % lab.dir)
    return problems


@pytest.fixture(scope="session")
def lab():
    """The lab, up for the whole session in its own directory, removed afterwards;
    tagged with $QBORG_LAB_TAG when that is set.

    `up()` runs twice: the second run must be a no-op that keeps sshd (checked
    in test_lab.py through `lab.sshd_pids_at_up`). Teardown checks that `down()`
    left no sshd, qrexec broker, user, owner record or directory behind.
    """
    if os.geteuid() != 0:
        pytest.fail(NEED_ROOT, pytrace=False)
    directory = tempfile.mkdtemp(prefix="qborg-lab-", dir="/var/tmp")
    try:
        the_lab = Lab(directory=directory, tag=os.environ.get("QBORG_LAB_TAG", ""))
    except qborg_lab.LabError as error:
        os.rmdir(directory)
        pytest.fail("QBORG_LAB_TAG: %s" % error, pytrace=False)
    try:
        the_lab.up()
        first = the_lab.sshd_pid()
        the_lab.up()
        the_lab.sshd_pids_at_up = (first, the_lab.sshd_pid())
        yield the_lab
    finally:
        the_lab.down()
    problems = _leftovers(the_lab)
    assert not problems, "down() left: " + "; ".join(problems)
