#!/usr/bin/env python3
"""P-c: a backup through qborg against plain borg to a local repository.

In a lab of its own (tag ``bench``), dom0, backup-admin and vm-personal are
applied, and vm-personal's ~/Documents gets ~1 GB in 10,000 files
(BENCH_QUICK=1: 100 MB in 1,000), generated deterministically: 40% text-like
(compressible, never twice the same), 30% already compressed (zlib output),
30% random; 1% of the files hold 70% of the bytes. Each timed run:

* qborg: a fresh repository (removed on the server, created again by the
  admin qube's apply with the VM's key, the client's borg cache cleared),
  then `borgmatic create` as the qube's user with the config qborg
  generated: over the lab's loopback ssh, through the append-only forced
  command; then the same again with nothing changed (the re-run);
* baseline: `borg init` of a local repository in the qube user's home (same
  encryption), then `borg create` of the same directories with the same
  compression and excludes, and the unchanged re-run;
* for reference (row P-c/ssh): plain `borg create` of the same directories
  to a fresh qborg repository through the same ssh alias, key and forced
  command, without borgmatic: what the loopback transport alone costs.

Both use the borg the qube runs ($QBORG_LAB_BORG or Debian's). The data stays
in the page cache for both (it was just written; 24 GB of memory).

    sudo .venv/bin/python bench/backup.py [--mb 1000] [--files 10000]
"""

import argparse
import os
import pwd
import random
import shutil
import sys
import zlib

import yaml

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import benchlib as b  # noqa: E402

CLIENT = "vm-personal"
THROUGHPUT_TARGET = 0.8
RERUN_TARGET = 2.0
DATA_DIR = "Documents/bench-data"

# text-like bytes: letters with English-like frequencies, spaces, some
# punctuation and line breaks; each byte of random input becomes one of them
_WEIGHTS = ("e" * 12 + "t" * 9 + "a" * 8 + "o" * 8 + "i" * 7 + "n" * 7 + "s" * 6 + "h" * 6
            + "r" * 6 + "d" * 4 + "l" * 4 + "c" * 3 + "u" * 3 + "m" * 2 + "w" * 2 + "f" * 2
            + "g" * 2 + "y" * 2 + "p" * 2 + "bvkjxqz" + " " * 18 + ".,\n\n")
TEXT_TABLE = bytes((_WEIGHTS * 4)[:256], "ascii")


def text_bytes(rng, size):
    return rng.randbytes(size).translate(TEXT_TABLE)


def compressed_bytes(rng, size):
    out, packer = [], zlib.compressobj(6)
    produced = 0
    while produced < size:
        piece = packer.compress(text_bytes(rng, 1 << 20))
        out.append(piece)
        produced += len(piece)
    return b"".join(out)[:size]


KINDS = (("text", text_bytes), ("zlib", compressed_bytes), ("random", lambda r, n: r.randbytes(n)))


def kind_of(index):
    digit = index % 10
    return KINDS[0] if digit < 4 else KINDS[1] if digit < 7 else KINDS[2]


def file_sizes(total, files):
    """Deterministic sizes: 1% of the files carry 70% of the bytes."""
    big = max(1, files // 100)
    small = files - big
    rng = random.Random(20241)
    sizes = []
    for i in range(files):
        if i % 100 == 99 or small == 0:
            share = 0.7 * total / big
        else:
            share = 0.3 * total / small
        sizes.append(max(1, int(share * rng.uniform(0.5, 1.5))))
    return sizes


def make_data(root, total, files, owner):
    """The data set under root (owned by the qube user); returns its byte count."""
    if os.path.isdir(root):
        shutil.rmtree(root)
    made = 0
    for i, size in enumerate(file_sizes(total, files)):
        name, make = kind_of(i)
        directory = os.path.join(root, "d%03d" % (i // 100))
        if i % 100 == 0:
            os.makedirs(directory)
        path = os.path.join(directory, "f%05d.%s" % (i, name))
        data = make(random.Random(i * 7919 + size), size)
        with open(path, "wb") as handle:
            handle.write(data)
        made += len(data)
    for base, dirs, names in os.walk(root):
        for name in [base] + [os.path.join(base, n) for n in dirs + names]:
            os.chown(name, *owner)
    return made


def client_config(lab):
    """source_directories, exclude_patterns, compression of the config qborg wrote."""
    path = os.path.join(lab.home(CLIENT), ".config", "borgmatic.d", "qborg.yaml")
    with open(path, encoding="utf-8") as handle:
        conf = yaml.safe_load(handle)
    flat = {}
    for section in ("location", "storage"):
        flat.update(conf.get(section) or {})
    flat.update({k: v for k, v in conf.items() if not isinstance(v, dict)})
    return flat


def fresh_qborg_repository(lab):
    """Remove the VM's repository on the server; the admin's apply creates it
    again with the VM's key (as on first provisioning); clear the client's cache."""
    shutil.rmtree(os.path.join(lab.home(lab.server_user), "qborg", CLIENT), ignore_errors=True)
    rc, result = lab.apply("backup-admin")
    if rc != 0:
        raise RuntimeError("admin apply failed: %s" % result)
    home = lab.home(CLIENT)
    for sub in (".cache/borg", ".config/borg/security"):
        shutil.rmtree(os.path.join(home, sub), ignore_errors=True)


def plain_borg_over_ssh(lab, conf):
    """`borg create` of the same directories straight to the VM's repository
    through the same ssh alias, key and forced command, without borgmatic:
    what the transport alone costs (the repository is fresh, as for qborg)."""
    home = lab.home(CLIENT)
    env = {"BORG_PASSCOMMAND": "cat %s" % os.path.join(home, ".config", "qborg", "passphrase"),
           "BORG_REMOTE_PATH": conf.get("remote_path") or "borg",
           "BORG_RELOCATED_REPO_ACCESS_IS_OK": "yes"}
    argv = ["borg", "create", "--compression", conf.get("compression") or "lz4"]
    for pattern in conf.get("exclude_patterns") or []:
        argv += ["--exclude", pattern]
    argv.append("%s::plain-borg" % conf["repositories"][0])
    argv += conf["source_directories"]
    seconds, proc = b.timed(lab.run, CLIENT, argv, check=False, env=env)
    if proc.returncode != 0:
        raise RuntimeError("borg create over ssh failed: %s" % proc.stderr[-3000:])
    return seconds


def borgmatic_create(lab):
    seconds, proc = b.timed(lab.run, CLIENT, ["borgmatic", "--syslog-verbosity", "-1", "create"],
                            check=False)
    if proc.returncode != 0:
        raise RuntimeError("borgmatic create failed: %s" % (proc.stdout + proc.stderr)[-3000:])
    return seconds


class LocalBaseline:
    """borg create to a repository in the qube user's home, same borg,
    encryption, compression and excludes as the qborg config."""

    def __init__(self, lab, conf):
        self.lab = lab
        home = lab.home(CLIENT)
        self.base = os.path.join(home, ".bench-local")
        self.repo = os.path.join(self.base, "repo")
        self.conf = conf
        self.env = {"BORG_BASE_DIR": os.path.join(self.base, "borg"),
                    "BORG_PASSCOMMAND": "cat %s" % os.path.join(self.base, "passphrase")}
        self.count = 0

    def reset(self):
        owner = pwd.getpwnam(self.lab.user(CLIENT))
        shutil.rmtree(self.base, ignore_errors=True)
        os.makedirs(self.base, mode=0o700)
        with open(os.path.join(self.base, "passphrase"), "w", encoding="utf-8") as handle:
            handle.write("bench-only local baseline\n")
        for name in (self.base, os.path.join(self.base, "passphrase")):
            os.chown(name, owner.pw_uid, owner.pw_gid)
        self.lab.run(CLIENT, ["borg", "init", "--encryption=repokey-blake2", self.repo],
                     env=self.env)

    def create(self):
        self.count += 1
        argv = ["borg", "create", "--compression", self.conf.get("compression") or "lz4"]
        for pattern in self.conf.get("exclude_patterns") or []:
            argv += ["--exclude", os.path.expanduser(pattern.replace("~", self.lab.home(CLIENT), 1))]
        argv.append("%s::bench-%d" % (self.repo, self.count))
        argv += [d.replace("~", self.lab.home(CLIENT), 1) for d in self.conf["source_directories"]]
        seconds, _proc = b.timed(self.lab.run, CLIENT, argv, env=self.env)
        return seconds

    def remove(self):
        shutil.rmtree(self.base, ignore_errors=True)


def measure(lab, megabytes, files):
    for qube in ("dom0", "backup-admin", CLIENT):
        rc, result = lab.apply(qube)
        if rc != 0:
            raise RuntimeError("first apply of %s failed: %s" % (qube, result))
    entry = pwd.getpwnam(lab.user(CLIENT))
    b.log("generating %d MB in %d files" % (megabytes, files))
    total = make_data(os.path.join(lab.home(CLIENT), DATA_DIR), megabytes * 10 ** 6, files,
                      (entry.pw_uid, entry.pw_gid))
    conf = client_config(lab)
    local = LocalBaseline(lab, conf)
    version = lab.run(CLIENT, ["borg", "--version"]).stdout.strip()
    qborg_runs, local_runs, qborg_reruns, local_reruns, ssh_runs = [], [], [], [], []
    for i in range(b.runs(3, fast=2)):
        def qborg_side():
            fresh_qborg_repository(lab)
            qborg_runs.append(borgmatic_create(lab))
            qborg_reruns.append(borgmatic_create(lab))

        def local_side():
            local.reset()
            local_runs.append(local.create())
            local_reruns.append(local.create())

        def ssh_side():
            fresh_qborg_repository(lab)
            ssh_runs.append(plain_borg_over_ssh(lab, conf))

        sides = (qborg_side, local_side, ssh_side)
        for side in (sides if i % 2 == 0 else sides[::-1]):
            side()
        b.log("run %d: qborg %.1f s (re-run %.2f s), local %.1f s (re-run %.2f s), "
              "plain borg over ssh %.1f s" % (i + 1, qborg_runs[-1], qborg_reruns[-1],
                                              local_runs[-1], local_reruns[-1], ssh_runs[-1]))
    local.remove()
    mb = total / 1e6
    qborg_mbs, local_mbs = mb / b.median(qborg_runs), mb / b.median(local_runs)
    ssh_mbs = mb / b.median(ssh_runs)
    compression = conf.get("compression")
    return [
        b.row("P-c", "backup of %d MB, %d files: qborg's borgmatic over ssh vs local borg"
              % (round(mb), files), qborg_mbs, local_mbs, "MB/s",
              ">= %.1fx (throughput)" % THROUGHPUT_TARGET,
              qborg_mbs / local_mbs >= THROUGHPUT_TARGET,
              note="%s, compression %s; qborg %s, local %s"
              % (version, compression, b.spread(qborg_runs), b.spread(local_runs))),
        b.row("P-c/ssh", "the same backup: qborg vs plain borg create over the same ssh",
              qborg_mbs, ssh_mbs, "MB/s", "(the transport's share)", None,
              note="plain borg over ssh, seconds: %s; local is %.2fx of it"
              % (b.spread(ssh_runs), local_mbs / ssh_mbs)),
        b.row("P-c2", "unchanged re-run over %d files (qborg vs local)" % files,
              b.median(qborg_reruns), b.median(local_reruns), "s", "<= %.0f s" % RERUN_TARGET,
              b.median(qborg_reruns) <= RERUN_TARGET,
              note="qborg %s" % b.spread(qborg_reruns)),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--mb", type=int, default=100 if b.quick() else 1000)
    parser.add_argument("--files", type=int, default=1000 if b.quick() else 10000)
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    opts = parser.parse_args()
    b.need_root()
    with b.bench_lab(keep=opts.keep) as lab:
        rows = measure(lab, opts.mb, opts.files)
    b.emit(rows)


if __name__ == "__main__":
    main()
