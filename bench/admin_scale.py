#!/usr/bin/env python3
"""Benchmark: provisioning N VMs from the admin qube costs one SSH session
and one authorized_keys upload, not N.

Runs as root in a lab of its own (tag ``bench`` unless $QBORG_LAB_TAG is
set): a real sshd as the backup server and the lab's admin key. For N = 1 and
N = 200 (``--sizes``) it starts from an empty keystore and the server's
original authorized_keys, then times ``qborg_admin.provision`` for N VMs:
key and passphrase generation, one session, one upload, the fresh login that
proves the admin still gets in. The repositories are made to exist already
(a stub ``config`` on the server and a stub exported key), so what is timed
is the admin's own work; each ``borg init`` is one borg run per new VM and
is not part of this comparison. Prints per N the seconds, connections,
uploads and lines, and the ratio of the largest N to the smallest.

    sudo .venv/bin/python bench/admin_scale.py [--sizes 1,200] [--keep]
"""

import argparse
import copy
import json
import os
import pwd
import shutil
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "lab"))
sys.path.insert(0, os.path.join(REPO, "salt", "_modules"))

import yaml  # noqa: E402

import _qborg_base as base_mod  # noqa: E402
import _qborg_settings as settings_mod  # noqa: E402
import _qborg_repos as repos  # noqa: E402
import _qborg_keystore as keystore_mod  # noqa: E402
import _qborg_server as server_mod  # noqa: E402
import _qborg_admin as admin  # noqa: E402
from qborg_lab import Lab  # noqa: E402


def settings_for(lab, n):
    with open(os.path.join(REPO, "salt", "qborg", "defaults.yaml"), encoding="utf-8") as f:
        raw = yaml.safe_load(f)["qborg"]
    overlay = lab.lab_pillar("backup-admin")["qborg"]
    raw = copy.deepcopy(raw)
    raw.update(admin_vm="backup-admin", user=overlay["user"], paths=overlay["paths"])
    raw["server"].update(overlay["server"])
    raw["vms"] = {f"vm-bench{i:03d}": {} for i in range(n)}
    return settings_mod.validate_settings(raw)


def prepare(lab, n, original):
    """An empty keystore, the server's original authorized_keys and N stub
    repositories (and exported keys); returns the settings for N VMs."""
    home = lab.home("backup-admin")
    entry = pwd.getpwnam(lab.user("backup-admin"))
    owner = (entry.pw_uid, entry.pw_gid)
    srv = pwd.getpwnam(lab.server_user)
    keystore = os.path.join(home, ".local", "share", "qborg")
    shutil.rmtree(keystore, ignore_errors=True)
    shutil.rmtree(os.path.join(lab.home(lab.server_user), "qborg"), ignore_errors=True)
    with open(lab.authorized_keys_path, "wb") as f:
        f.write(original)
    settings = settings_for(lab, n)
    store = keystore_mod.Keystore(keystore, owner)
    for vm in settings["vms"]:
        for path in (store.base, os.path.join(store.base, "vms"), store.vm_dir(vm)):
            base_mod.ensure_dir(path, 0o700, owner)
        base_mod.atomic_write(os.path.join(store.vm_dir(vm), "repokey"), "stub\n", 0o600, owner)
        repo = os.path.join(lab.home(lab.server_user), "qborg", vm)
        os.makedirs(repo)
        open(os.path.join(repo, "config"), "w").close()
        for path in (os.path.dirname(repo), repo):
            os.chown(path, srv.pw_uid, srv.pw_gid)
    return settings


def run(lab, n, original):
    home = lab.home("backup-admin")
    entry = pwd.getpwnam(lab.user("backup-admin"))
    owner = (entry.pw_uid, entry.pw_gid)
    settings = prepare(lab, n, original)
    store = keystore_mod.Keystore(os.path.join(home, ".local", "share", "qborg"), owner)
    counts = {"connections": 0, "uploads": 0}
    real_client = server_mod.ServerSession._new_client
    real_upload = server_mod.ServerSession.upload_authorized_keys

    def counting_client(self):
        counts["connections"] += 1
        return real_client(self)

    def counting_upload(self, *args, **kwargs):
        counts["uploads"] += 1
        return real_upload(self, *args, **kwargs)

    server_mod.ServerSession._new_client = counting_client
    server_mod.ServerSession.upload_authorized_keys = counting_upload
    try:
        started = time.perf_counter()
        admin.provision(settings, home, owner)
        seconds = time.perf_counter() - started
    finally:
        server_mod.ServerSession._new_client = real_client
        server_mod.ServerSession.upload_authorized_keys = real_upload
    with open(lab.authorized_keys_path, encoding="utf-8") as f:
        block = repos.split_managed_block(f.read())[1]
    assert block == admin.managed_lines(settings, store), "authorized_keys lines differ"
    return {"vms": n, "seconds": round(seconds, 3), "lines": len(block), **counts}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="1,200")
    parser.add_argument("--keep", action="store_true", help="leave the lab up")
    opts = parser.parse_args()
    sizes = [int(x) for x in opts.sizes.split(",")]
    tag = os.environ.get("QBORG_LAB_TAG", "bench")
    directory = tempfile.mkdtemp(prefix="qborg-bench-", dir="/var/tmp")
    lab = Lab(directory=directory, tag=tag)
    lab.up()
    try:
        with open(lab.authorized_keys_path, "rb") as f:
            original = f.read()
        run(lab, 1, original)  # warm-up: imports, first handshake
        results = [run(lab, n, original) for n in sizes]
    finally:
        if not opts.keep:
            lab.down()
    for r in results:
        print(f"N={r['vms']:4d}  {r['seconds']:7.3f} s  connections={r['connections']}  "
              f"uploads={r['uploads']}  lines={r['lines']}")
    small, large = results[0], results[-1]
    print(f"ratio N={large['vms']} / N={small['vms']}: {large['seconds'] / small['seconds']:.2f}x "
          f"for {large['vms'] // small['vms']}x the VMs")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
