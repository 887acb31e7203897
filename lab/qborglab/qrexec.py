"""dom0's qrexec daemon: the lab's broker (LAB/bin/qrexec-broker, run as
root), the stand-ins the broker and the qubes run, and the registry that
maps the lab's unix users to qubes.

The broker itself, with its policy parser, is lab/bin/qrexec-broker: one
program of the standard library alone, copied into LAB/bin; this part
installs, starts and stops it."""

import json
import os
import re
import socket
import time

from .common import HERE, LabError, _mkdir, _must, _pidfile_pid, _proc_matches, _stop_pid, _write

# the stand-ins for dom0's qvm-* tools (one program, lab/bin/qvm-prefs, over
# lab/bin/qubesd.py, its record and qubesd's checks)
DOM0_TOOLS = ("qvm-check", "qvm-prefs", "qvm-features", "qvm-service", "qvm-tags",
              "qvm-firewall", "qvm-create", "qvm-remove")
# the stand-ins for a qube's own qubesdb-read and systemctl (its cron unit)
QUBE_TOOLS = ("qubesdb-read", "systemctl")
# what every lab qube takes from its template's root (qubes-core-agent):
# LAB/template/<path> stands for /<path> in each qube
TEMPLATE_FILES = {"qubes.Filecopy": os.path.join("etc", "qubes-rpc", "qubes.Filecopy"),
                  "qfile-unpacker": os.path.join("usr", "lib", "qubes", "qfile-unpacker")}
# Qubes' own default for the file copy (qubes-core-admin:
# qubes-rpc-policy/90-default.policy, R4.2): the user confirms each copy in
# a dom0 dialog. The lab's dom0 has this line of that file and no other.
DEFAULT_POLICY = ("# the qubes.Filecopy line of Qubes' 90-default.policy (R4.2); the lab's\n"
                  "# broker logs each ask and says yes for the user\n"
                  "qubes.Filecopy          *           @anyvm          @anyvm      ask\n")


def _lab_broker_pids():
    """{pid: lab directory} of every running qrexec broker of any lab."""
    return _proc_matches(re.compile(r"/bin/qrexec-broker --lab (\S+)"))


class QrexecMixin:
    """The qrexec broker of a lab, the stand-ins in LAB/bin, the registry."""

    def _install_stand_ins(self):
        for name in (("qrexec-client-vm", "qrexec-broker", "qvm-run", "qube-root-shell",
                      "qubes-notification-sink") + DOM0_TOOLS + QUBE_TOOLS):
            source = os.path.join(HERE, "bin", name)
            with open(source, encoding="utf-8") as handle:
                _write(os.path.join(self.bin_dir, name), handle.read(), 0o755)
        with open(os.path.join(HERE, "bin", "qubesd.py"), encoding="utf-8") as handle:
            _write(os.path.join(self.bin_dir, "qubesd.py"), handle.read(), 0o644)
        for name, relative in TEMPLATE_FILES.items():
            target = os.path.join(self.template_dir, relative)
            path = self.template_dir
            _mkdir(path, 0o755)
            for part in os.path.dirname(relative).split(os.sep):
                path = os.path.join(path, part)
                _mkdir(path, 0o755)
            with open(os.path.join(HERE, "bin", name), encoding="utf-8") as handle:
                _write(target, handle.read(), 0o755)
        _write(os.path.join(self.policy_dir(), "90-default.policy"), DEFAULT_POLICY, 0o644)
        # an older lab's sudo-based dispatcher
        if os.path.lexists(os.path.join(self.bin_dir, "qrexec-dispatch")):
            os.unlink(os.path.join(self.bin_dir, "qrexec-dispatch"))
        for qube in self.QUBES:
            if self.USERS[qube] is None:
                continue
            # in a qube qrexec-client-vm and qubesdb-read are on every PATH,
            # as /usr/bin is
            for name in ("qrexec-client-vm", "qubesdb-read"):
                tool = os.path.join(self.bin_dir, name)
                link = os.path.join(self.prefix(qube), "bin", name)
                if os.path.islink(link) or os.path.exists(link):
                    if os.path.islink(link) and os.readlink(link) == tool:
                        continue
                    os.unlink(link)
                os.symlink(tool, link)

    def _write_registry(self):
        qubes = {}
        for qube in self.QUBES:
            qubes[qube] = {"user": self.USERS[qube], "home": self.home(qube),
                           "prefix": self.prefix(qube)}
        registry = {"dir": self.dir, "policy_dir": self.policy_dir(), "qubes": qubes,
                    "system_rpc_dir": os.path.join(self.template_dir, "etc", "qubes-rpc")}
        _write(self.registry_path, json.dumps(registry, indent=2) + "\n", 0o644)

    @property
    def template_dir(self):
        """The root file system every lab qube takes from its template: its
        etc/qubes-rpc is each qube's /etc/qubes-rpc."""
        return self._p("template")

    @property
    def broker_socket(self):
        return self._p("qrexec", "broker.sock")

    @property
    def broker_pidfile(self):
        return self._p("qrexec", "broker.pid")

    @property
    def broker_log(self):
        return self._p("qrexec", "broker.log")

    def broker_pid(self):
        program = os.path.join(self.bin_dir, "qrexec-broker") + " --lab " + self.dir
        return _pidfile_pid(self.broker_pidfile, program)

    def _broker_answers(self):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(2)
        try:
            sock.connect(self.broker_socket)
            return True
        except OSError:
            return False
        finally:
            sock.close()

    def _start_broker(self):
        """Start the qrexec broker of this lab (root, a daemon), unless it runs."""
        if len(self.broker_socket.encode()) > 107:
            raise LabError("lab directory %s is too long for a unix socket path "
                           "(choose a shorter --dir)" % self.dir)
        if self.broker_pid() and self._broker_answers():
            return self.broker_pid()
        self._stop_broker()
        _mkdir(self._p("qrexec"), 0o755)
        program = os.path.join(self.bin_dir, "qrexec-broker")
        _must(["/usr/bin/python3", "-I", program, "--lab", self.dir, "--daemon"])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.broker_pid() and self._broker_answers():
                return self.broker_pid()
            time.sleep(0.05)
        raise LabError("the qrexec broker did not start (see %s)" % self.broker_log)

    def _stop_broker(self):
        pid = self.broker_pid()
        if pid:
            _stop_pid(pid)
        for other, directory in _lab_broker_pids().items():
            if directory == self.dir:
                _stop_pid(other)
        for path in (self.broker_pidfile, self.broker_socket):
            if os.path.lexists(path):
                os.unlink(path)
