#!/usr/bin/python3
"""The qborg lab: a whole Qubes system played on one Linux host.

* a real OpenSSH server on 127.0.0.1 (its own port, config and host key) as the
  borg server, login user ``qborg-srv``;
* one unix user per qube (``backup-admin``, ``vm-personal``, ``vm-work``); dom0
  has none, its Salt runs as root;
* with a tag T (``QBORG_LAB_TAG`` or ``--tag``) the unix users are ``T-qborg-srv``,
  ``T-backup-admin``, ... and the owner record is ``/etc/qborg-lab/owner-T``, so
  labs with different tags (and one untagged lab) live side by side on one host;
  the qube names stay the same in every lab;
* per qube a stand-in for ``/usr/local`` (``LAB/qubes/<qube>/usr-local``) and a
  ``salt-call --local`` setup with the qube's name as minion id and its pillar;
* dom0's policy directory (``LAB/qubes/dom0/policy.d``) and a qrexec stand-in:
  a broker run as root (``LAB/bin/qrexec-broker``, socket
  ``LAB/qrexec/broker.sock``) that learns the caller from the kernel
  (SO_PEERCRED), checks that policy and runs the target's service as the
  target's user, streaming both ways to ``LAB/bin/qrexec-client-vm``;
* qubes without network (``add_qube(name, network=False)``): everything the lab
  runs for them, their Salt included, runs in a network namespace of its own
  with no interface up.

Usable as a module (``Lab``) and as a command::

    python lab/qborg_lab.py [--tag T] [--dir DIR] up [--pillar FILE]
    python lab/qborg_lab.py down
    python lab/qborg_lab.py apply QUBE [salt args...]
    python lab/qborg_lab.py apply-ssh QUBE [salt args...]
    python lab/qborg_lab.py salt QUBE salt-call args...
    python lab/qborg_lab.py run QUBE cmd...
    python lab/qborg_lab.py server cmd...
    python lab/qborg_lab.py status

Only the standard library is required (PyYAML is used for the user pillar when
present). Everything here needs root.

The code is the package lab/qborglab/ (one module per job, see its
__init__); this file re-exports it, names and all, and is its command.
"""

import os
import sys

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    # run with -I (no script directory on sys.path), or loaded from its path
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qborglab.accounts import ACCOUNTS_LOCK, ADMIN_KEY_COMMENT, _AccountsLock  # noqa: E402
from qborglab.cli import main  # noqa: E402
from qborglab.common import (DEFAULT_DIR, HERE, MARKER, OWNER_RECORD, SAFE_PATH_RE,  # noqa: E402
                             STD_PATH, SUDOERS, TAG_RE, LabCommandError, LabError, _check_tag,
                             _checked, _cmdline, _mkdir, _must, _pid_alive, _quiet, _stop_pid,
                             _tagged, _user, _write, default_dir, owner_record_path,
                             sudoers_path)
from qborglab.cron import (CRON_SPECIALS, QUBE_UNITS, QUBES_SERVICE_DIR,  # noqa: E402
                           SERVICE_NAME_RE, _cron_command, _cron_due, _cron_field,
                           _host_cron_pids)
from qborglab.dom0 import SALT_STAND_INS  # noqa: E402
from qborglab.lab import Lab  # noqa: E402
from qborglab.qrexec import DOM0_TOOLS, QUBE_TOOLS, _lab_broker_pids  # noqa: E402
from qborglab.salt import yaml  # noqa: E402
from qborglab.server import (SSHD_CONFIG_NAME, _ensure_host_key, _free_port,  # noqa: E402
                             _lab_sshd_pids, _launch_sshd, _ssh_banner, qubes_sshd_config_name,
                             sshd_config_name)
from qborglab.server2 import server2_config_name  # noqa: E402

__all__ = [
    "ACCOUNTS_LOCK", "ADMIN_KEY_COMMENT", "CRON_SPECIALS", "DEFAULT_DIR", "DOM0_TOOLS", "HERE",
    "Lab", "LabCommandError", "LabError", "MARKER", "OWNER_RECORD", "QUBES_SERVICE_DIR",
    "QUBE_TOOLS", "QUBE_UNITS", "SAFE_PATH_RE", "SALT_STAND_INS", "SERVICE_NAME_RE",
    "SSHD_CONFIG_NAME", "STD_PATH", "SUDOERS", "TAG_RE", "_AccountsLock", "_check_tag",
    "_checked", "_cmdline", "_cron_command", "_cron_due", "_cron_field", "_ensure_host_key",
    "_free_port", "_host_cron_pids", "_lab_broker_pids", "_lab_sshd_pids", "_launch_sshd",
    "_mkdir", "_must", "_pid_alive", "_quiet", "_ssh_banner", "_stop_pid", "_tagged", "_user",
    "_write", "default_dir", "main", "owner_record_path", "qubes_sshd_config_name",
    "server2_config_name", "sshd_config_name", "sudoers_path", "yaml",
]

if __name__ == "__main__":
    sys.exit(main())
