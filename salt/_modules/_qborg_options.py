"""What a VM backs up and how, in borgmatic's own options: patterns,
exclusions, one file system, commands around the backup, SQLite dumps,
upload rate and lock wait; validated from pillar and rendered for the
borgmatic a qube has. The borgmatic options that would undercut qborg are
refused with the reason.
"""

import os
import re
import shlex

from _qborg_base import require
from _qborg_checks import version_tuple


# the pillar keys (per VM and in qborg:defaults) and their defaults
OPTION_DEFAULTS = {
    "patterns": [], "exclude_caches": False, "exclude_if_present": [], "one_file_system": True,
    "before_backup": [], "after_backup": [], "sqlite_databases": [],
    "upload_rate_limit": None, "lock_wait": None,
}


OPTION_KEYS = tuple(OPTION_DEFAULTS)


_PRUNE = ("the VM never prunes, compacts or deletes: its key is append-only, so that would "
          "only mark data deleted and raise the admin qube's tampering alarm; the admin "
          "qube's maintenance prunes by qborg:vms:<vm>:retention (or qborg:defaults:retention)")
_REPOSITORY = ("each VM backs up to the one repository qborg created, locked its key to, "
               "audits, prunes and exports (qborg:vms:<vm>:repository names one on another "
               "account); another repository would be none of that")
_PASSPHRASE = ("qborg holds the repository passphrase in the VM's bundle, rotates it and "
               "exports it for recovery; a passphrase or passcommand of your own would not "
               "open the repository qborg created, and the admin qube could no longer audit, "
               "prune, rotate or export it")
_SSH = ("the VM reaches the server only through qborg's `Host qborg` alias, with its own "
        "key and the pinned host key; another ssh command or remote borg would go around "
        "that pin (set qborg:server:remote_path for the server's borg)")
_KEYS = ("borg's key, security and config directories stay where borg and qborg look: "
         "the security directory is how borg notices a server that swaps or rolls back the "
         "repository, and qborg exports the repository key from where it put it")
_NAMES = ("qborg names archives <vm>-<time>; the admin qube's audit and prune, `borgbak` "
          "and qborg-backup rely on that name")
_TRUST = ("qborg accepts only the encrypted repository it created (and allows its own "
          "relocation to the `qborg` alias); accepting an unknown unencrypted one would "
          "let a server swap in a repository of its own")
_FLAGS = ("raw borg flags could override the pinned host key (--rsh), the remote borg, "
          "the repository or the lock; the options qborg passes through are settings of "
          "their own (qborg:vms:<vm>:patterns, exclude_caches, upload_rate_limit, ...)")
_COMMANDS = ("use before_backup and after_backup, which run around the backup only; "
             "borgmatic's `commands:` could also hook prune, compact and delete actions")


# borgmatic options a user might reach for that qborg refuses, with why
REFUSED = {
    "prune": _PRUNE, "compact": _PRUNE, "delete": _PRUNE, "keep_within": _PRUNE,
    "keep_secondly": _PRUNE, "keep_minutely": _PRUNE, "keep_hourly": _PRUNE,
    "keep_daily": _PRUNE, "keep_weekly": _PRUNE, "keep_monthly": _PRUNE,
    "keep_13weekly": _PRUNE, "keep_3monthly": _PRUNE, "keep_yearly": _PRUNE,
    "before_prune": _PRUNE, "after_prune": _PRUNE, "before_compact": _PRUNE,
    "after_compact": _PRUNE, "compact_threshold": _PRUNE,
    "repositories": _REPOSITORY,
    "encryption_passcommand": _PASSPHRASE, "encryption_passphrase": _PASSPHRASE,
    "ssh_command": _SSH, "remote_path": _SSH, "local_path": _SSH,
    "borg_keys_directory": _KEYS, "borg_key_file": _KEYS, "borg_security_directory": _KEYS,
    "borg_base_directory": _KEYS, "borg_config_directory": _KEYS,
    "archive_name_format": _NAMES, "match_archives": _NAMES, "prefix": _NAMES,
    "unknown_unencrypted_repo_access_is_ok": _TRUST, "relocated_repo_access_is_ok": _TRUST,
    "extra_borg_options": _FLAGS, "commands": _COMMANDS,
}


def refuse_unknown(key, field, known):
    """A key that is not a qborg setting: refused with the reason when it is
    a borgmatic option that would undercut qborg, else named unknown."""
    require(key not in REFUSED, field, f"refused: {REFUSED.get(key)}")
    require(False, field, f"unknown setting (known: {', '.join(known)})")


# validation

# a borg pattern line: R/r root path, P/p default style, + include,
# - exclude, ! exclude without recursing (`borg help patterns`)
PATTERN_RE = re.compile(r"^([RrPp+!-]) (\S.*)\Z")


PATTERN_STYLES = ("fm", "sh", "re", "pp", "pf")


# a file name borg takes as one argument: not '.' or '..', no leading '-'
FILE_NAME_RE = re.compile(r"^(?!\.\.?\Z)[A-Za-z0-9_.+,@%=~][A-Za-z0-9_.+,@%=~-]{0,254}\Z")


DATABASE_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")


def _one_line(value):
    """A non-empty string without NUL, line break or other control character
    (a tab aside): what reaches a YAML value, a pattern file or a shell."""
    return (isinstance(value, str) and value.strip() != ""
            and not any(ord(c) < 32 and c != "\t" or ord(c) == 127 for c in value))


def _list_of(value, field, what):
    require(isinstance(value, list), field, f"must be a list of {what}")
    return value


def _check_patterns(value, field):
    for i, line in enumerate(_list_of(value, field, "borg pattern lines like '- ~/Downloads'")):
        m = PATTERN_RE.match(line) if _one_line(line) else None
        require(m, f"{field}[{i}]",
                f"{line!r} is not a borg pattern line: one of R (root), + (include), "
                f"- (exclude), ! (exclude, do not recurse) or P (style), a space, then the "
                f"path or pattern, e.g. '- ~/Downloads' or '+ sh:~/Documents/**'")
        if m.group(1) in "Pp":
            require(m.group(2) in PATTERN_STYLES, f"{field}[{i}]",
                    f"{m.group(2)!r} is not a pattern style (known: {', '.join(PATTERN_STYLES)})")
    return list(value)


def _check_file_names(value, field):
    for i, name in enumerate(_list_of(value, field, "file names like .nobackup")):
        require(isinstance(name, str) and FILE_NAME_RE.match(name), f"{field}[{i}]",
                f"{name!r} is not a file name (no '/', no control character; a directory "
                f"holding a file of that name is left out)")
    return list(value)


def _check_commands(value, field):
    for i, command in enumerate(_list_of(value, field, "shell commands")):
        require(_one_line(command) and len(command) <= 4000, f"{field}[{i}]",
                "must be one shell command on one line (at most 4000 characters)")
    return list(value)


def _check_path(value, field):
    require(_one_line(value) and (value.startswith("/") or value == "~"
                                  or value.startswith("~/")) and len(value) <= 1000,
            field, f"{value!r} must be an absolute path or start with ~/")
    return value


def _check_sqlite(value, field):
    databases, names = [], set()
    for i, db in enumerate(_list_of(value, field, "{name, path} of SQLite databases")):
        item = f"{field}[{i}]"
        require(isinstance(db, dict), item, "must be a mapping {name: NAME, path: PATH}")
        for key in db:
            require(key in ("name", "path"), f"{item}:{key}",
                    "unknown setting of a database (known: name, path)")
        name = db.get("name")
        require(isinstance(name, str) and DATABASE_NAME_RE.match(name), f"{item}:name",
                f"{name!r} is not a dump name (letters, digits, '_', '.', '-', at most 64)")
        require(name not in names, f"{item}:name",
                f"{name!r} names another database too: each dump needs a name of its own")
        names.add(name)
        databases.append({"name": name, "path": _check_path(db.get("path"), f"{item}:path")})
    return databases


def _check_bool(value, field):
    require(isinstance(value, bool), field, "must be true or false")
    return value


def _check_count(value, field, what, most):
    require(value is None or isinstance(value, int) and not isinstance(value, bool)
            and 0 < value <= most, field, f"must be null or {what} from 1 to {most}")
    return value


def check_options(vm, overrides, name):
    """The options of one VM (vm: its merged settings, overrides: its own
    pillar), validated and normalised into vm; an error names the VM's
    field when it set the value, else qborg:defaults'."""
    checks = {
        "patterns": _check_patterns, "exclude_caches": _check_bool,
        "exclude_if_present": _check_file_names, "one_file_system": _check_bool,
        "before_backup": _check_commands, "after_backup": _check_commands,
        "sqlite_databases": _check_sqlite,
        "upload_rate_limit": lambda v, f: _check_count(v, f, "kB/s, a whole number", 10 ** 9),
        "lock_wait": lambda v, f: _check_count(v, f, "seconds, a whole number", 86400),
    }
    for key, check in checks.items():
        field = f"qborg:vms:{name}:{key}" if key in overrides else f"qborg:defaults:{key}"
        value = vm.get(key)
        if value is None and OPTION_DEFAULTS[key] is not None:
            value = OPTION_DEFAULTS[key]
        vm[key] = check(value, field)
    return vm


# rendering

# borgmatic's SQLite hook came with 1.7.9; before it (Debian 12's 1.7.7)
# qborg dumps with the same sqlite3 command in a before_backup command,
# into the directory that borgmatic puts into every archive (~/.borgmatic)
SQLITE_HOOK_SINCE = (1, 7, 9)


# `commands:` came with 2.0.0, its `states:` (an after command only when the
# backup succeeded, as after_backup always ran) with 2.0.3
COMMANDS_SINCE = (2, 0, 3)


def expand_home(path, home):
    if path == "~":
        return home
    if path.startswith("~/"):
        return os.path.join(home, path[2:])
    return path


def expand_pattern(line, home):
    """A pattern line with a leading ~ of its path (after an optional style
    prefix such as sh:) made the home: borg does not expand it."""
    command, rest = line[0], line[2:]
    if command in "Pp":
        return line
    m = re.match(r"^([a-z]{2}:)?(~(/.*)?)\Z", rest)
    if not m:
        return line
    return f"{command} {m.group(1) or ''}{expand_home(m.group(2), home)}"


def sqlite_dump_commands(databases, home):
    """(before, after) shell commands that dump each database with sqlite3
    as borgmatic's own hook does (where 1.7.9 to 1.8 put it), for a
    borgmatic without that hook; after the backup the dumps go."""
    dumps = os.path.join(home, ".borgmatic", "sqlite_databases")
    directory = shlex.quote(dumps + "/localhost")
    before = [f"umask 077 && mkdir -p {directory} && sqlite3 -bail "
              f"{shlex.quote(expand_home(db['path'], home))} .dump > "
              f"{directory}/{shlex.quote(db['name'])}" for db in databases]
    after = [f"rm -rf {shlex.quote(dumps)}"] if databases else []
    return before, after


def borgmatic_options(vm_settings, home, version):
    """The options for borgmatic's sections (location, storage, hooks; the
    flat format takes the same keys at the top), only those set, so that a
    VM without options keeps the config it had."""
    v = version_tuple(version)
    get = vm_settings.get
    location = {"one_file_system": get("one_file_system", True)}
    if get("patterns"):
        location["patterns"] = [expand_pattern(line, home) for line in vm_settings["patterns"]]
    if get("exclude_caches"):
        location["exclude_caches"] = True
    if get("exclude_if_present"):
        location["exclude_if_present"] = list(vm_settings["exclude_if_present"])
    storage = {key: get(key) for key in ("upload_rate_limit", "lock_wait") if get(key)}
    hooks = {}
    before, after = list(get("before_backup") or []), list(get("after_backup") or [])
    databases = [{"name": db["name"], "path": expand_home(db["path"], home)}
                 for db in get("sqlite_databases") or []]
    if databases and v < SQLITE_HOOK_SINCE:
        dump, cleanup = sqlite_dump_commands(databases, home)
        before, after = before + dump, after + cleanup
    elif databases:
        hooks["sqlite_databases"] = databases
    if v >= COMMANDS_SINCE:
        commands = []
        if before:
            commands.append({"before": "action", "when": ["create"], "run": before})
        if after:
            commands.append({"after": "action", "when": ["create"], "states": ["finish"],
                             "run": after})
        if commands:
            hooks["commands"] = commands
    else:
        hooks.update({key: value for key, value in (("before_backup", before),
                                                     ("after_backup", after)) if value})
    return {"location": location, "storage": storage, "hooks": hooks}
