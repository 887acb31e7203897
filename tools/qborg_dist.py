#!/usr/bin/python3
"""Lay qborg out as dom0's /srv expects it, and pack it.

    python3 tools/qborg_dist.py [--out dist]      # dist/qborg-VERSION.tar.gz and dist/qborg.spec
    python3 tools/qborg_dist.py --stage DIR       # the same tree, unpacked into DIR (a /srv)

The tree, relative to /srv:

    salt/qborg/                 the formula (init.sls dispatches on the minion id;
                                no state top: `state.apply qborg` needs none)
    salt/_modules/qborg.py      the execution module, and beside it
    salt/_modules/_qborg_*.py   the Salt-free core (private to Salt's loader;
                                salt-ssh ships only the files of _modules and
                                _states to a qube, so the core lives there)
    salt/_states/qborg.py
    pillar/qborg/init.top       for `qubesctl top.enable qborg pillar=True`
    pillar/qborg/init.sls.example   pillar.example; copy it to init.sls and edit

Every symlink in the source tree becomes a regular file (salt-ssh packs a
symlink as a symlink, which dangles in the qube). The tarball is reproducible:
sorted entries, owner root, one timestamp (SOURCE_DATE_EPOCH, else the
FORMULA file's). Its modes are the ones Qubes keeps everything under
/srv/salt and /srv/pillar at (qubes-mgmt-salt-base-config:
qubes/directories.sls): directories 0750, files 0640 (root reads them:
dom0's salt-call, the copy of /srv that qubesctl hands the management
disposable). It carries no entry for `salt` and `pillar` themselves, so
`tar -xzf ... -C /srv` (as root, which restores a member's mode exactly)
leaves /srv/salt and /srv/pillar as they are.

Only the standard library: runs with any Python 3, dom0's included.
"""

import argparse
import gzip
import io
import os
import re
import shutil
import sys
import tarfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "qborg"
# the core: every _qborg_*.py beside the execution module (the one list)
CORE_GLOB = re.compile(r"^_qborg_[a-z0-9_]+\.py$")

# the pillar's own top file: every qube gets the qborg pillar, so that
# init.sls can tell each one its part (or none)
PILLAR_TOP = """\
# qborg's pillar: enable with `sudo qubesctl top.enable qborg pillar=True`.
# Settings only, never a secret: pillar is rendered in dom0 and copied into
# each qube's management disposable.
base:
  '*':
    - qborg
"""


# Qubes' modes under /srv/salt and /srv/pillar (qubes/directories.sls)
DIR_MODE = 0o750
FILE_MODE = 0o640
# the roots Qubes owns: no member for them, tar leaves them as they are
SRV_ROOTS = ("salt", "pillar")


class DistError(RuntimeError):
    pass


class Text(str):
    """Content made here rather than a file of the source tree."""


def formula_info(repo=REPO):
    """name, version and release from the FORMULA file."""
    info = {}
    with open(os.path.join(repo, "FORMULA"), encoding="utf-8") as handle:
        for line in handle:
            match = re.match(r"^([a-z_]+):\s*(\S.*?)\s*$", line)
            if match:
                info[match.group(1)] = match.group(2)
    for key in ("version", "release"):
        if not re.match(r"^[0-9][0-9A-Za-z.+~]*$", info.get(key, "")):
            raise DistError("FORMULA: %s is missing or not a version (%r)" % (key, info.get(key)))
    return info


def _skip(name):
    return name == "__pycache__" or name.endswith((".pyc", ".pyo")) or name.startswith(".")


def layout(repo=REPO):
    """[(path relative to /srv, source file or Text)], sorted; a source file
    is read through any symlink."""
    salt_dir = os.path.join(repo, "salt")
    entries = {}
    formula = os.path.join(salt_dir, NAME)
    for root, dirs, files in os.walk(formula, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not _skip(d))
        for name in files:
            if _skip(name):
                continue
            source = os.path.join(root, name)
            entries[os.path.join("salt", os.path.relpath(source, salt_dir))] = source
    entries["salt/_modules/qborg.py"] = os.path.join(salt_dir, "_modules", "qborg.py")
    entries["salt/_states/qborg.py"] = os.path.join(salt_dir, "_states", "qborg.py")
    for name in sorted(os.listdir(os.path.join(salt_dir, "_modules"))):
        if CORE_GLOB.match(name):
            entries["salt/_modules/" + name] = os.path.join(salt_dir, "_modules", name)
    entries["pillar/qborg/init.top"] = Text(PILLAR_TOP)
    entries["pillar/qborg/init.sls.example"] = os.path.join(repo, "pillar.example")
    for path, source in entries.items():
        if not isinstance(source, Text) and not os.path.isfile(source):
            raise DistError("%s: source %s is missing" % (path, source))
    return sorted(entries.items())


def _content(source):
    if isinstance(source, Text):
        return source.encode("utf-8")
    with open(source, "rb") as handle:
        return handle.read()


def stage(destination, repo=REPO):
    """Write the tree into DESTINATION (a /srv); returns the paths written.
    Files already there that qborg does not ship are left alone."""
    written = []
    for path, source in layout(repo):
        target = os.path.join(destination, path)
        os.makedirs(os.path.dirname(target), mode=DIR_MODE, exist_ok=True)
        tmp = target + ".qborg-new"
        with open(tmp, "wb") as handle:
            handle.write(_content(source))
        os.chmod(tmp, FILE_MODE)
        if os.path.islink(target) or os.path.isdir(target):
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            else:
                os.unlink(target)
        os.replace(tmp, target)
        written.append(path)
    return written


def _mtime(repo):
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        return int(epoch)
    return int(os.stat(os.path.join(repo, "FORMULA")).st_mtime)


def tarball(out_dir, repo=REPO):
    """out_dir/qborg-VERSION.tar.gz, paths relative to /srv."""
    info = formula_info(repo)
    mtime = _mtime(repo)
    path = os.path.join(out_dir, "%s-%s.tar.gz" % (NAME, info["version"]))
    entries = layout(repo)
    dirs = set()
    for rel, _source in entries:
        parent = os.path.dirname(rel)
        while parent and parent not in SRV_ROOTS:
            dirs.add(parent)
            parent = os.path.dirname(parent)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as tar:
        members = [(d, None) for d in dirs] + entries
        for rel, source in sorted(members, key=lambda item: item[0]):
            member = tarfile.TarInfo(rel)
            member.uid = member.gid = 0
            member.uname = member.gname = "root"
            member.mtime = mtime
            if source is None:
                member.type = tarfile.DIRTYPE
                member.mode = DIR_MODE
                tar.addfile(member)
            else:
                data = _content(source)
                member.mode = FILE_MODE
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    os.makedirs(out_dir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw:
        # mtime=0 and no file name in the gzip header: the same bytes every time
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as packed:
            packed.write(buffer.getvalue())
    os.replace(tmp, path)
    return path


def spec(out_dir, repo=REPO):
    """out_dir/qborg.spec from rpm/qborg.spec.in."""
    info = formula_info(repo)
    with open(os.path.join(repo, "rpm", "qborg.spec.in"), encoding="utf-8") as handle:
        text = handle.read()
    values = {"VERSION": info["version"], "RELEASE": info["release"],
              "SUMMARY": info.get("summary", NAME)}
    text = re.sub(r"@([A-Z]+)@", lambda m: values[m.group(1)], text)
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, NAME + ".spec")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="qborg_dist.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.path.join(REPO, "dist"),
                        help="where the tarball and the spec go (default: dist/)")
    parser.add_argument("--stage", metavar="DIR",
                        help="instead: lay the tree out in DIR, as in dom0's /srv")
    opts = parser.parse_args(argv)
    try:
        if opts.stage:
            stage(opts.stage)
            print(opts.stage)
            return 0
        print(tarball(opts.out))
        print(spec(opts.out))
    except (DistError, OSError) as error:
        print("qborg dist: %s" % error, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
