#!/usr/bin/env python3
"""qborg demo: the whole system once, in the lab, on real parts.

A real OpenSSH server on 127.0.0.1 plays the backup server; unix users play
the qubes dom0, backup-admin, vm-personal and vm-work. The demo applies qborg
to each qube as qubesctl would, backs each VM up with the installed
borgmatic, lists the archives, restores a file and compares it byte for byte,
re-applies everything expecting zero changes, and tears the lab down.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from qborg_lab import Lab  # noqa: E402

CLIENTS = ("vm-personal", "vm-work")
ORDER = ("dom0", "backup-admin") + CLIENTS


def say(text):
    print(text, flush=True)


def step(text):
    say(f"\n==> {text}")


def summarize(qube, rc, result):
    if not isinstance(result, dict):  # Salt's render errors come as a list
        for error in result if isinstance(result, list) else [result]:
            say(f"      ERROR {error}")
        raise SystemExit(f"state.apply qborg failed on {qube}: the states did not render")
    failed = [k for k, v in result.items() if v.get("result") is False]
    changed = [v.get("__id__", k) for k, v in result.items() if v.get("changes")]
    say(f"    {qube:13} states: {len(result):2}  changed: {len(changed):2}  failed: {len(failed)}"
        + (f"  ({', '.join(sorted(changed))})" if changed else ""))
    for key in failed:
        say(f"      FAILED {result[key].get('__id__', key)}: {result[key].get('comment')}")
    if rc != 0 or failed:
        raise SystemExit(f"state.apply qborg failed on {qube}")
    return len(changed)


def seed_files(lab, qube):
    """Some documents to back up: text and incompressible bytes."""
    script = (
        "import os, sys\n"
        "d = os.path.expanduser('~/Documents'); os.makedirs(d + '/notes', exist_ok=True)\n"
        "open(d + '/notes/todo.txt', 'w').write('back up %s\\n' % sys.argv[1] * 200)\n"
        "open(d + '/photo.bin', 'wb').write(os.urandom(1 << 20))\n"
        "os.makedirs(os.path.expanduser('~/.cache'), exist_ok=True)\n"
        "open(os.path.expanduser('~/.cache/skip-me'), 'w').write('excluded')\n"
    )
    lab.run(qube, ["/usr/bin/python3", "-c", script, qube])


def main():
    lab = Lab()
    users = ", ".join(lab.user(qube) for qube in ORDER[1:])
    step(f"lab up in {lab.dir}: sshd on 127.0.0.1, users {users}")
    lab.up()
    say(f"    backup server: {lab.server_user}@127.0.0.1:{lab.port}  host key {lab.host_key[:40]}...")
    try:
        for qube in CLIENTS:
            seed_files(lab, qube)

        # as the Quick start runs them: qubesctl applies dom0 before its
        # targets, so dom0's second run finds the admin qube set up and
        # pushes it the settings and the qubes' definitions
        for targets in (["backup-admin"], list(CLIENTS)):
            step(f"qubesctl --targets={','.join(targets)} state.apply qborg (dom0 first)")
            for qube in ["dom0"] + targets:
                rc, result = lab.apply(qube)
                summarize(qube, rc, result)

        restored = {}
        for qube in CLIENTS:
            step(f"{qube}: backup with the installed borgmatic")
            out = lab.run(qube, ["borgmatic", "--syslog-verbosity", "-1", "--verbosity", "1",
                                 "create", "--stats"], check=False)
            say("    " + "\n    ".join((out.stdout + out.stderr).strip().splitlines()[-12:]))
            if out.returncode != 0:
                raise SystemExit(f"borgmatic create failed on {qube}")

            step(f"{qube}: borgbak list")
            archives = lab.run(qube, ["borgbak", "list", "--short"]).stdout.split()
            say("    " + "\n    ".join(archives))
            if not archives:
                raise SystemExit(f"no archive listed on {qube}")
            archive = archives[-1]

            relpath = os.path.join(lab.home(qube), "Documents", "photo.bin").lstrip("/")
            step(f"{qube}: borgbak extract {archive} {relpath}")
            with tempfile.TemporaryDirectory(prefix="qborg-restore-") as tmp:
                os.chmod(tmp, 0o777)
                lab.run(qube, ["sh", "-c", f'cd "{tmp}" && borgbak extract "$1" "$2"', "sh",
                               archive, relpath])
                extracted = [os.path.relpath(os.path.join(d, f), tmp)
                             for d, _dirs, files in os.walk(tmp) for f in files]
                with open(os.path.join(tmp, relpath), "rb") as a, \
                        open("/" + relpath, "rb") as b:
                    same = a.read() == b.read()
            say(f"    restored files: {extracted}")
            say(f"    restored file identical to the original: {'yes' if same else 'NO'}")
            if not same or extracted != [relpath]:
                raise SystemExit(f"restore on {qube} did not give back exactly {relpath}")
            restored[qube] = (archive, same)

        step("second state.apply qborg of every qube: expecting zero changes")
        total = 0
        for qube in ORDER:
            rc, result = lab.apply(qube)
            total += summarize(qube, rc, result)
        if total:
            raise SystemExit(f"second apply reported {total} changes")

        step("summary")
        for qube, (archive, same) in restored.items():
            say(f"    {qube:13} archive {archive}  restore identical: {same}")
        say("    second apply of dom0, backup-admin, vm-personal, vm-work: 0 changes")
        say("\nqborg demo: OK")
    finally:
        step("lab down")
        lab.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
