"""The qborg lab as a package: one module per job, behind one facade, `Lab`.

* ``common``: the lab's places on the host, its errors, small helpers;
* ``accounts``: the unix users, the admin key, the owner record;
* ``server``: the borg server's sshd (and what every lab sshd shares);
* ``server2``: a second borg server (its own sshd and login), for second copies;
* ``qrexec``: dom0's qrexec daemon (the broker), the stand-ins, the registry;
* ``dom0``: dom0's record of its qubes and the Qubes pillar it renders;
* ``salt``: a qube's pillar, minion config and ``salt-call``;
* ``salt_ssh``: ``salt-ssh`` from a management disposable, the qube sshd;
* ``netns``: commands as a qube's user, qubes without network;
* ``cron``: a qube's boot, its service flags and its cron;
* ``borg``: which borg and borgmatic the qubes and the server run;
* ``lab``: the facade ``Lab`` (``up``, ``down``, ``status``, added qubes);
* ``cli``: the command line of ``lab/qborg_lab.py``.
"""

from .cli import main
from .common import (LabCommandError, LabError, default_dir, owner_record_path,
                     sudoers_path)
from .lab import Lab
from .qrexec import _lab_broker_pids
from .server import _lab_sshd_pids, qubes_sshd_config_name, sshd_config_name
from .server2 import server2_config_name

__all__ = ["Lab", "LabCommandError", "LabError", "_lab_broker_pids", "_lab_sshd_pids",
           "default_dir", "main", "owner_record_path", "qubes_sshd_config_name",
           "server2_config_name", "sshd_config_name", "sudoers_path"]
