"""The admin qube's keystore: one ed25519 key and passphrase per VM, the
state of a key rotation, and the bundle that hands a VM its own secrets.
"""

import fcntl
import json
import os
import re
import time

from _qborg_base import QborgBundleError, atomic_write, ensure_dir, iso, load_json, read_text
from _qborg_settings import BUNDLE_FORMAT, check_qube_name
from _qborg_servers import HOST_KEY_RE, REMOTE_PATH_RE, repository_url, vm_server
from _qborg_repos import known_hosts_host, vm_authorized_keys_line


# keystore (admin qube)


def generate_ssh_key(comment):
    """A new ed25519 key: (private key in OpenSSH format, public key line)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH,
    ).decode()
    return private, f"{public} {comment}"


def generate_passphrase():
    """A repository passphrase with 256 bits of entropy."""
    from passlib import pwd

    return pwd.genword(entropy=256, charset="ascii_62")


def public_key_of(private_text):
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_private_key(private_text.encode(), password=None)
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH,
    ).decode()


class Keystore:
    """Per-VM secrets in the admin qube: <base>/vms/<vm>/{ssh_key,ssh_key.pub,passphrase}.
    Directories 0700, secret files 0600, all owned by the admin qube's user."""

    def __init__(self, base, owner=None):
        self.base = base
        self.owner = owner

    def vm_dir(self, vm):
        check_qube_name(vm, "vm")
        return os.path.join(self.base, "vms", vm)

    def key_path(self, vm):
        return os.path.join(self.vm_dir(vm), "ssh_key")

    def passphrase_path(self, vm):
        return os.path.join(self.vm_dir(vm), "passphrase")

    def known_hosts_path(self):
        return os.path.join(self.base, "known_hosts")

    def has(self, vm):
        return all(os.path.exists(p) for p in (
            self.key_path(vm), self.key_path(vm) + ".pub", self.passphrase_path(vm)))

    def ensure(self, vm):
        """Generate the VM's key and passphrase if they are missing. True if created."""
        if self.has(vm):
            return False
        for path in (self.base, os.path.join(self.base, "vms"), self.vm_dir(vm)):
            ensure_dir(path, 0o700, self.owner)
        private, public = generate_ssh_key(f"qborg:{vm}")
        if not os.path.exists(self.passphrase_path(vm)):
            atomic_write(self.passphrase_path(vm), generate_passphrase() + "\n", 0o600, self.owner)
        # public key last: its presence marks the key pair complete
        atomic_write(self.key_path(vm), private, 0o600, self.owner)
        atomic_write(self.key_path(vm) + ".pub", public + "\n", 0o644, self.owner)
        return True

    def public_key(self, vm):
        return read_text(self.key_path(vm) + ".pub").strip()

    def private_key(self, vm):
        return read_text(self.key_path(vm))

    def passphrase(self, vm):
        return read_text(self.passphrase_path(vm)).strip()


# bundle (qborg.GetBundle)


def make_bundle(settings, vm, keystore, known_hosts_line):
    server = vm_server(settings, vm)
    return {
        "format": BUNDLE_FORMAT,
        "vm": vm,
        "repository": repository_url(server, vm),
        "remote_path": server["remote_path"],
        "ssh_private_key": keystore.private_key(vm),
        "known_hosts": known_hosts_line,
        "passphrase": keystore.passphrase(vm),
    }


def parse_bundle(text, expected_vm):
    """Validate a bundle before anything is written. Messages never quote secrets."""
    if len(text) > 65536:
        raise QborgBundleError("bundle is larger than 64 KiB; refusing it")
    try:
        bundle = json.loads(text)
    except ValueError:
        if text.lstrip().startswith("{"):
            raise QborgBundleError(
                f"bundle is not valid JSON: it ends after {len(text)} bytes (truncated or "
                "damaged on the way); refusing it") from None
        raise QborgBundleError("bundle is not valid JSON (is qborg.GetBundle installed "
                               "in the admin qube and the policy allowing this qube?)") from None
    if not isinstance(bundle, dict):
        raise QborgBundleError("bundle is not a JSON object")
    if bundle.get("format") != BUNDLE_FORMAT:
        raise QborgBundleError(f"bundle format {bundle.get('format')!r} is not {BUNDLE_FORMAT}; "
                               "update qborg in the admin qube and here to the same version")
    if bundle.get("vm") != expected_vm:
        raise QborgBundleError(f"bundle is for {bundle.get('vm')!r}, not for this qube "
                               f"({expected_vm}); refusing it")
    for field in ("repository", "remote_path", "ssh_private_key", "known_hosts", "passphrase"):
        if not isinstance(bundle.get(field), str) or not bundle[field]:
            raise QborgBundleError(f"bundle field {field!r} is missing or empty")
    if not REMOTE_PATH_RE.match(bundle["remote_path"]):
        raise QborgBundleError("bundle field 'remote_path' is not a borg command path")
    if not re.match(r"^ssh://[A-Za-z0-9_.-]+@[A-Za-z0-9.-]+:[0-9]{1,5}/\./[A-Za-z0-9_./-]+\Z",
                    bundle["repository"]):
        raise QborgBundleError("bundle field 'repository' is not an ssh:// borg repository URL")
    if any(c in bundle["passphrase"] for c in "\r\n\0") or len(bundle["passphrase"]) < 20:
        raise QborgBundleError("bundle field 'passphrase' is not a valid passphrase")
    kh = bundle["known_hosts"].strip()
    parts = kh.split()
    if "\n" in kh or len(parts) < 3 or not HOST_KEY_RE.match(" ".join(parts[1:3])):
        raise QborgBundleError("bundle field 'known_hosts' is not one 'HOST TYPE KEY' line")
    try:
        public_key_of(bundle["ssh_private_key"])
    except Exception:  # any parse error: never echo the key itself
        raise QborgBundleError("bundle field 'ssh_private_key' is not an OpenSSH private key") from None
    return bundle


def check_bundle_matches(bundle, settings, vm):
    """A parsed bundle must agree with this qube's own pillar: its repository,
    remote_path and the server's host (and pinned host key) in known_hosts.
    A bundle that names another server or host key was tampered with or
    comes from an admin qube with other settings: refused before anything
    is written. Messages never quote secrets."""
    server = vm_server(settings, vm)
    expected = {"repository": repository_url(server, vm), "remote_path": server["remote_path"]}
    for field, value in expected.items():
        if bundle[field] != value:
            raise QborgBundleError(
                f"bundle field {field!r} is {bundle[field]!r}, but this qube's pillar says "
                f"{value!r}; refusing it (apply qborg to the admin qube so both have the same "
                f"settings, and check it was not tampered with)")
    host, key = bundle["known_hosts"].split()[0], " ".join(bundle["known_hosts"].split()[1:3])
    if host != known_hosts_host(server):
        raise QborgBundleError(
            f"bundle field 'known_hosts' names {host!r}, not this qube's server "
            f"{known_hosts_host(server)!r}; refusing it")
    if settings["server"]["host_key"] and key != settings["server"]["host_key"]:
        raise QborgBundleError(
            "bundle field 'known_hosts' carries another host key than qborg:server:host_key "
            f"pins for {known_hosts_host(server)}; refusing it")
    return bundle


class KeystoreLock:
    """flock on <keystore>/lock: serialises provisioning between the Salt
    state (root, for the admin user) and qborg.GetBundle (the admin user)."""

    def __init__(self, keystore_base, owner=None):
        self.path = os.path.join(keystore_base, "lock")
        self.owner = owner
        self.fd = None

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        if self.owner is not None and os.geteuid() == 0:
            os.fchown(self.fd, self.owner[0], self.owner[1])
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)
        return False


# rotation of a VM's ssh key and repository passphrase
#
# stage "staged":    next key and passphrase in <keystore>/vms/<vm>/next; both
#                    keys in authorized_keys, each forced to the same repository;
#                    bundles carry the next key and passphrase_next
# stage "delivered": the VM fetched such a bundle (qborg.GetBundle records it)
# stage "changing":  `borg key change-passphrase` is under way
# stage "promoted":  next key/passphrase are the current ones; the old key's
#                    line is removed next, then the rotation record goes


def rotation_path(keystore, vm):
    return os.path.join(keystore.vm_dir(vm), "rotation.json")


def next_dir(keystore, vm):
    return os.path.join(keystore.vm_dir(vm), "next")


def rotation_state(keystore, vm):
    return load_json(rotation_path(keystore, vm))


def set_rotation(keystore, vm, stage, **extra):
    state = rotation_state(keystore, vm) or {}
    state.update(extra, vm=vm, stage=stage)
    state.setdefault("started", time.time())
    state[f"{stage}_at"] = iso(time.time())
    atomic_write(rotation_path(keystore, vm), json.dumps(state, indent=2) + "\n", 0o600,
                 keystore.owner)
    return state


def rotation_authorized_lines(settings, keystore, vms=None):
    """authorized_keys lines of next keys of VMs in rotation (stages staged,
    delivered, changing): the same forced command as the current key."""
    lines = []
    for vm in sorted(settings["vms"] if vms is None else vms):
        state = rotation_state(keystore, vm)
        pub = os.path.join(next_dir(keystore, vm), "ssh_key.pub")
        if state and state.get("stage") in ("staged", "delivered", "changing") and os.path.exists(pub):
            lines.append(vm_authorized_keys_line(settings, vm, read_text(pub).strip()))
    return lines


def rotation_bundle(bundle, keystore, vm):
    """A bundle asked for during a rotation carries the next key (already
    accepted by the server) and the next passphrase as passphrase_next; the
    delivery is recorded so the rotation may complete."""
    state = rotation_state(keystore, vm)
    if not state or state.get("stage") not in ("staged", "delivered"):
        return bundle
    ndir = next_dir(keystore, vm)
    bundle = dict(bundle)
    bundle["ssh_private_key"] = read_text(os.path.join(ndir, "ssh_key"))
    bundle["passphrase_next"] = read_text(os.path.join(ndir, "passphrase")).strip()
    if state["stage"] == "staged":
        set_rotation(keystore, vm, "delivered")
    return bundle
