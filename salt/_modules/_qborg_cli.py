"""The `qborg` command of the admin qube: maintenance, status, rotation,
export and import, the recreate script of the VMs' qubes, and restore into
another qube.
"""

import argparse
import json
import os
import sys

from _qborg_base import QborgError, one_line, read_json_document
from _qborg_settings import maintenance_settings, validate_settings
from _qborg_maint import ALARM_EXIT, status_table
from _qborg_copies import (
    accept_copy, break_lock_copy, drill_all, maintain_all, rotate_all, status_all,
)
from _qborg_drill import drill_summary
from _qborg_export import export_keepass, export_paper, import_keepass, read_password
from _qborg_qubes import definitions_path, read_definitions
from _qborg_recreate import recreate_script
from _qborg_notify import admin_notices
from _qborg_restore import restore, summary_line

RESTORE_LEFT_OUT_EXIT = 4  # restored, but some items of the archive were left out


# command line (prefix/bin/qborg and prefix/bin/qborg-maint)


def load_settings(settings_path):
    raw = read_json_document(settings_path, lambda exc: QborgError(
        f"cannot read the admin settings {settings_path} ({exc}); apply qborg to the admin qube"))
    return raw, validate_settings(raw), maintenance_settings(raw)


def _print_maintenance(out, as_json):
    if as_json:
        print(json.dumps(out, indent=2, sort_keys=True))
        return
    if not out["ran"]:
        print("maintenance: not due yet" if not out["errors"] else
              "maintenance: " + "; ".join(out["errors"].values()))
        return
    for vm, res in out["vms"].items():
        if res.get("alarm"):
            line = f"{vm}: ALARM: {'; '.join(res['findings'])}; prune and compact skipped"
            print(one_line(line), file=sys.stderr)
        elif res.get("error"):
            print(one_line(f"{vm}: error: {res['error']}"), file=sys.stderr)
        else:
            print(one_line(f"{vm}: ok, {res['archives']} archives, pruned {len(res['pruned'])}"
                           + (", full check" if res["checked"] else "")
                           + (f"; {res['postponed']}" if res.get("postponed") else "")))
    _print_drills(out)


def _print_drills(out):
    """One line per restore drill; a failed one on stderr, as an alarm."""
    for label, res in sorted((out.get("drills") or {}).items()):
        failed = res["ok"] is False
        line = one_line(f"{label}: {'ALARM: ' if failed else ''}restore drill: "
                        f"{drill_summary(res)}")
        print(line, file=sys.stderr if failed else sys.stdout)


def main(argv, settings_path, prog="qborg"):
    parser = argparse.ArgumentParser(prog=prog, description="qborg in the admin qube: status, "
                                     "maintenance, key rotation, offline export, restore "
                                     "into another qube")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("status", help="per VM: last archive, age, count, size, alarm, key age")
    p.add_argument("--json", action="store_true", help="JSON for scripts")
    p = sub.add_parser("maint", help="audit, then prune, compact and check every repository")
    p.add_argument("--scheduled", action="store_true",
                   help="only if the last run is older than qborg:maintenance:interval")
    p.add_argument("--check", dest="check", action="store_true", default=None,
                   help="run borg check now")
    p.add_argument("--no-check", dest="check", action="store_false")
    p.add_argument("--json", action="store_true")
    p.add_argument("vms", nargs="*", help="only these VMs (VM: every copy; VM@SERVER: the "
                                          "copy on that server)")
    p = sub.add_parser("drill", help="read one random file of each VM's latest archive back "
                                     "through borg (nothing is written), and record the result")
    p.add_argument("--json", action="store_true")
    p.add_argument("vms", nargs="*", help="only these VMs (VM: every copy; VM@SERVER: the "
                                          "copy on that server)")
    p = sub.add_parser("accept", help="take VM's repository as it is now as the audit baseline "
                                      "(after looking into an alarm)")
    p.add_argument("vm", help="VM, or VM@SERVER for its copy on a server other than the first")
    p = sub.add_parser("break-lock", help="remove the lock of VM's repository on the server "
                                          "(when no backup of VM and no maintenance runs)")
    p.add_argument("vm", help="VM, or VM@SERVER for its copy on a server other than the first")
    p = sub.add_parser("rotate", help="start, or advance, the rotation of VM's key and passphrase")
    p.add_argument("vm")
    p = sub.add_parser("export", help="write every key and passphrase to a KeePass (KDBX 4) file")
    p.add_argument("path")
    p.add_argument("--password-fd", type=int, metavar="N",
                   help="read the master password from file descriptor N (0: stdin)")
    p.add_argument("--paper", action="store_true",
                   help="plain text (mode 0600) to print, no master password: delete it after")
    p = sub.add_parser("recreate", help="print the dom0 commands (qvm-create, qvm-prefs, ...) "
                                        "that rebuild VMs as dom0 recorded them, to run in dom0")
    p.add_argument("--json", action="store_true", help="the definitions themselves, as JSON")
    p.add_argument("vms", nargs="*", help="these VMs (default: every VM with a definition)")
    p = sub.add_parser("import", help="rebuild the keystore and the admin key from an export "
                                      "(disaster recovery); never overwrites a file")
    p.add_argument("path")
    p.add_argument("--password-fd", type=int, metavar="N",
                   help="read the master password from file descriptor N (0: stdin)")
    p = sub.add_parser("restore", help="send VM's archive (or PATHs in it) into another qube "
                                       "through Qubes' file copy, which asks you in dom0")
    p.add_argument("vm", help="VM, or VM@SERVER for its copy on a server other than the first")
    p.add_argument("--to", required=True, metavar="QUBE",
                   help="the qube to restore into (its ~/QubesIncoming/<this qube>/)")
    p.add_argument("--archive", metavar="NAME", help="the archive (default: the latest)")
    p.add_argument("paths", nargs="*", metavar="PATH",
                   help="only these files or directories, as the archive names them "
                        "(e.g. home/user/Documents)")
    args, extra = parser.parse_known_args(argv)
    if extra and args.command == "restore" and not any(x.startswith("-") for x in extra):
        args.paths += extra  # PATHs after --to QUBE: argparse leaves them over
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    home = os.path.expanduser("~")
    try:
        raw, settings, maint = load_settings(settings_path)
        if args.command == "status":
            data = status_all(settings, home)
            print(json.dumps(data, indent=2, sort_keys=True) if args.json else status_table(data))
            return ALARM_EXIT if any(e["alarm"] or e.get("drill_failed")
                                     for e in data["vms"]) else 0
        if args.command == "maint":
            out = maintain_all(settings, maint, home, vms=args.vms or None,
                               scheduled=args.scheduled, check=args.check)
            _print_maintenance(out, args.json)
            if out["ran"]:
                # the desktop's notices of what changed (logged, never printed)
                admin_notices(settings, maint, home, None, set(out["vms"]))
            if out["alarms"] or out.get("drill_failed"):
                return ALARM_EXIT
            return 1 if out["errors"] else 0
        if args.command == "drill":
            out = drill_all(settings, home, vms=args.vms or None)
            if args.json:
                print(json.dumps(out, indent=2, sort_keys=True))
            else:
                _print_drills(out)
            return ALARM_EXIT if out["drill_failed"] else 0
        if args.command == "accept":
            res = accept_copy(settings, home, None, args.vm)
            print(f"{res['vm']}: {res['archives']} archives are the new audit baseline")
            return 0
        if args.command == "break-lock":
            res = break_lock_copy(settings, home, None, args.vm)
            print(f"{res['vm']}: {res['message']}")
            return 0
        if args.command == "restore":
            res = restore(settings, home, args.vm, args.to, args.archive, args.paths,
                          report=lambda line: print(one_line(line), file=sys.stderr))
            if res.get("warning"):
                print(one_line(f"borg: {res['warning']}"), file=sys.stderr)
            print(summary_line(res))
            return RESTORE_LEFT_OUT_EXIT if res["skipped"] else 0
        if args.command == "rotate":
            for res in rotate_all(settings, home, None, args.vm):
                print(f"{res['vm']}: rotation {res['stage']}: {res['message']}")
            return 0
        if args.command == "recreate":
            definitions = read_definitions(definitions_path(settings_path))
            vms = args.vms or sorted(definitions)
            if not vms:
                raise QborgError("no qube definitions here: apply qborg to dom0 (it records "
                                 "every configured VM), or import an export that holds them")
            if args.json:
                missing = [vm for vm in vms if vm not in definitions]
                if missing:
                    raise QborgError(f"no definition of {', '.join(missing)}")
                print(json.dumps({vm: definitions[vm] for vm in vms}, indent=2, sort_keys=True))
            else:
                sys.stdout.write(recreate_script(definitions, vms))
            return 0
        definitions = read_definitions(definitions_path(settings_path)) \
            if args.command == "export" else None
        if args.command == "export" and args.paper:
            res = export_paper(settings, raw, home, args.path, definitions)
            print(f"wrote {res['path']} (plain text, mode 0600, {res['entries']} entries): "
                  "print it, then delete it")
            return 0
        if args.command == "export":
            password = read_password(args.password_fd, confirm=args.password_fd is None)
            res = export_keepass(settings, raw, home, args.path, password, definitions)
            print(f"wrote {res['path']} (KDBX 4) with entries: {', '.join(res['entries'])}")
            return 0
        if args.command == "import":
            password = read_password(args.password_fd, confirm=False,
                                     prompt="master password of the export: ")
            res = import_keepass(settings, home, args.path, password,
                                 definitions_file=definitions_path(settings_path))
            print(f"imported from {res['path']}: {', '.join(res['imported']) or 'nothing'}"
                  + (f"; already in place: {', '.join(res['unchanged'])}" if res["unchanged"]
                     else ""))
            if res["imported"]:
                print("now apply qborg to this qube: nothing is regenerated, every VM keeps "
                      "its key and passphrase")
            return 0
    except QborgError as exc:
        print(f"{prog}: {exc}", file=sys.stderr)
        return 1
    return 2
