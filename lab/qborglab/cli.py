"""The qborg lab: a whole Qubes system played on one Linux host.

The command line of lab/qborg_lab.py (`up`, `down`, `status`, `apply`,
`apply-ssh`, `salt`, `run`, `server`, `boot`, `tick`, `gui-login`,
`gui-logout`, `notifications`).
"""

import argparse
import json
import subprocess
import sys
import time

from .common import DEFAULT_DIR, LabError
from .lab import Lab


# --- command line ---------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="qborg_lab.py", description=__doc__.split("\n")[0])
    parser.add_argument("--tag", help="lab tag, 1-6 of [a-z0-9] starting with a letter: "
                                      "prefixes the lab's unix users, so labs with different "
                                      "tags run side by side (default $QBORG_LAB_TAG, else none)")
    parser.add_argument("--dir", help="lab directory (default $QBORG_LAB_DIR, else %s, or "
                                      "%s-TAG with a tag)" % (DEFAULT_DIR, DEFAULT_DIR))
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="create or repair the lab")
    p_up.add_argument("--pillar", help="YAML file to seed the user pillar with "
                                       "(default lab/pillar.lab.yaml)")
    sub.add_parser("down", help="remove the lab, its users and its sshd")
    sub.add_parser("status", help="show the lab")
    for name, text in (("apply", "state.apply qborg in QUBE"),
                       ("apply-ssh", "state.apply qborg in QUBE through salt-ssh, "
                                     "as qubesctl does (not dom0)"),
                       ("salt", "salt-call --local in QUBE"),
                       ("run", "run a command as QUBE's user")):
        p = sub.add_parser(name, help=text)
        p.add_argument("qube", choices=Lab.QUBES)
        p.add_argument("args", nargs=argparse.REMAINDER)
    p_srv = sub.add_parser("server", help="run a command as the server user")
    p_srv.add_argument("args", nargs=argparse.REMAINDER)
    for name, text in (("boot", "restart QUBE: its service flags afresh from dom0's features, "
                                "its cron only with the crond flag"),
                       ("tick", "one tick of QUBE's cron: run its due crontab entries, if its "
                                "cron runs"),
                       ("gui-login", "log QUBE's user in as its GUI agent does: session bus "
                                     "and notification agent"),
                       ("gui-logout", "end QUBE's GUI login"),
                       ("notifications", "the notices QUBE's notification agent took "
                                         "(JSON lines)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("qube", choices=[q for q in Lab.QUBES if q != "dom0"])
    opts = parser.parse_args(argv)
    try:
        lab = Lab(opts.dir, tag=opts.tag)
    except LabError as error:
        print("qborg lab: %s" % error, file=sys.stderr)
        return 1

    try:
        if opts.command == "up":
            started = time.monotonic()
            lab.up(opts.pillar)
            print("lab up in %s (%.1fs): sshd on 127.0.0.1:%d, host key %s"
                  % (lab.dir, time.monotonic() - started, lab.port, lab.host_key))
            return 0
        if opts.command == "down":
            lab.down()
            print("lab in %s removed" % lab.dir)
            return 0
        if opts.command == "status":
            info = lab.status()
            print(json.dumps(info, indent=2))
            return 0 if info["up"] else 3
        if opts.command == "apply-ssh":
            argv_, env = lab.salt_ssh_command(opts.qube, "state.apply", "qborg", *opts.args)
            return subprocess.run(argv_, env=env, check=False).returncode
        if opts.command in ("apply", "salt"):
            args = list(opts.args)
            if opts.command == "apply":
                lab.sync(opts.qube)
                args = ["--retcode-passthrough", "state.apply", "qborg"] + args
            argv_, env = lab.salt_command(opts.qube, *args)
            return subprocess.run(argv_, env=env, check=False).returncode
        if opts.command in ("boot", "tick", "gui-login"):
            lab._load_state()  # the lab must be up
        if opts.command == "gui-login":
            print("%s logged in: session bus %s" % (opts.qube, lab.gui_login(opts.qube)))
            return 0
        if opts.command == "gui-logout":
            lab.gui_logout(opts.qube)
            return 0
        if opts.command == "notifications":
            for notice in lab.notifications(opts.qube):
                print(json.dumps(notice, sort_keys=True))
            return 0
        if opts.command == "boot":
            lab.boot(opts.qube)
            print("%s booted: crond flag %s, cron %s"
                  % (opts.qube, "on" if lab.service_flag(opts.qube) else "off",
                     "running" if lab.cron_running(opts.qube) else "not running"))
            return 0
        if opts.command == "tick":
            if not lab.cron_running(opts.qube):
                print("%s: cron does not run (no crond flag at its boot, not started since)"
                      % opts.qube)
                return 3
            results = lab.cron_tick(opts.qube)
            for proc in results:
                print("exit %d: %s" % (proc.returncode, proc.args[-1]))
                sys.stdout.write(proc.stdout)
                sys.stderr.write(proc.stderr)
            return 0 if all(p.returncode == 0 for p in results) else 1
        if opts.command in ("run", "server"):
            if not opts.args:
                parser.error("%s needs a command" % opts.command)
            if opts.command == "run":
                proc = lab.run(opts.qube, opts.args, check=False)
            else:
                proc = lab.server(opts.args, check=False)
            sys.stdout.write(proc.stdout)
            sys.stderr.write(proc.stderr)
            return proc.returncode
    except LabError as error:
        print("qborg lab: %s" % error, file=sys.stderr)
        return 1
    return 2
