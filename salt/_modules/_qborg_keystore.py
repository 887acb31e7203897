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
from _qborg_servers import (
    COPY_NAME_RE, HOST_KEY_RE, REMOTE_PATH_RE, copy_settings, repository_url, vm_copies, vm_server)
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


# the fields of each copy in a bundle: the top level carries them for the
# VM's first copy, each entry of "copies" for another
COPY_FIELDS = ("repository", "remote_path", "ssh_private_key", "known_hosts", "passphrase")


MAX_COPIES = 16


def bundle_copy_entry(single, name):
    """One entry of a bundle's "copies": a copy's fields, as a bundle for
    that copy alone carries them at its top level, under its name."""
    entry = {"name": name}
    entry.update((field, single[field]) for field in COPY_FIELDS)
    if single.get("passphrase_next") is not None:
        entry["passphrase_next"] = single["passphrase_next"]
    return entry


def _check_copy_fields(entry, where):
    """A copy's fields (the top level's or an entry's), each in the shape
    qborg writes it; `where` names the copy in messages, "" for a bundle of
    one copy. Messages never quote secrets."""
    def field_name(field):
        return f"bundle field {field!r}{where}"

    for field in COPY_FIELDS:
        if not isinstance(entry.get(field), str) or not entry[field]:
            raise QborgBundleError(f"{field_name(field)} is missing or empty")
    if not REMOTE_PATH_RE.match(entry["remote_path"]):
        raise QborgBundleError(f"{field_name('remote_path')} is not a borg command path")
    if not re.match(r"^ssh://[A-Za-z0-9_.-]+@[A-Za-z0-9.-]+:[0-9]{1,5}/\./[A-Za-z0-9_./-]+\Z",
                    entry["repository"]):
        raise QborgBundleError(f"{field_name('repository')} is not an ssh:// borg repository URL")
    for field in ("passphrase", "passphrase_next"):
        value = entry.get(field)
        if field in entry and (not isinstance(value, str) or len(value) < 20
                               or any(c in value for c in "\r\n\0")):
            raise QborgBundleError(f"{field_name(field)} is not a valid passphrase")
    kh = entry["known_hosts"].strip()
    parts = kh.split()
    if "\n" in kh or len(parts) < 3 or not HOST_KEY_RE.match(" ".join(parts[1:3])):
        raise QborgBundleError(f"{field_name('known_hosts')} is not one 'HOST TYPE KEY' line")
    try:
        public_key_of(entry["ssh_private_key"])
    except Exception:  # any parse error: never echo the key itself
        raise QborgBundleError(
            f"{field_name('ssh_private_key')} is not an OpenSSH private key") from None


def _check_copies(bundle):
    """The copy names of a bundle ("copy" and each entry of "copies"), each
    entry checked like the top level."""
    names = []
    if "copy" in bundle:
        if not isinstance(bundle["copy"], str) or not COPY_NAME_RE.match(bundle["copy"]):
            raise QborgBundleError("bundle field 'copy' is not a server name")
        names.append(bundle["copy"])
    copies = bundle.get("copies", [])
    if copies and "copy" not in bundle:
        raise QborgBundleError("bundle has 'copies' but no field 'copy' naming its first copy")
    if not isinstance(copies, list) or len(copies) > MAX_COPIES - 1:
        raise QborgBundleError(f"bundle field 'copies' is not a list of at most "
                               f"{MAX_COPIES - 1} copies")
    for index, entry in enumerate(copies):
        name = entry.get("name") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not COPY_NAME_RE.match(name):
            raise QborgBundleError(f"bundle field 'copies' entry {index + 1} has no valid 'name'")
        if name in names:
            raise QborgBundleError(f"bundle names copy {name!r} twice")
        unknown = sorted(set(entry) - set(COPY_FIELDS) - {"name", "passphrase_next"})
        if unknown:
            raise QborgBundleError(f"bundle copy {name!r} has unknown fields: "
                                   f"{', '.join(map(repr, unknown))}")
        _check_copy_fields(entry, f" of copy {name!r}")
        names.append(name)


def parse_bundle(text, expected_vm):
    """Validate a bundle before anything is written: every copy's fields.
    Messages never quote secrets."""
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
    # a copy is named in messages when there are several to tell apart
    first = bundle.get("copy")
    _check_copy_fields(bundle, f" of copy {first!r}" if isinstance(first, str)
                       and COPY_NAME_RE.match(first) and bundle.get("copies") else "")
    _check_copies(bundle)
    return bundle


def bundle_copies(bundle, settings):
    """{copy name: its fields} of a parsed bundle, the top level's first; a
    bundle without "copy" (an admin qube of a single server) is one copy
    named after the first server."""
    first = bundle.get("copy") or settings["servers"][0]["name"]
    out = {first: {field: bundle[field] for field in COPY_FIELDS + ("passphrase_next",)
                   if field in bundle}}
    for entry in bundle.get("copies", []):
        out[entry["name"]] = {k: v for k, v in entry.items() if k != "name"}
    return out


def check_bundle_matches(bundle, settings, vm):
    """A parsed bundle must agree with this qube's own pillar: its copies
    are the servers the VM is assigned, and each copy's repository,
    remote_path and server host (and pinned host key) in known_hosts are
    that server's. A bundle that names another server or host key was
    tampered with or comes from an admin qube with other settings: refused
    before anything is written. Messages never quote secrets."""
    copies = bundle_copies(bundle, settings)
    wanted = vm_copies(settings, vm)
    if sorted(copies) != sorted(wanted):
        missing = [name for name in wanted if name not in copies]
        extra = [name for name in copies if name not in wanted]
        raise QborgBundleError(
            f"bundle carries the copies {', '.join(copies)}, but this qube's pillar assigns "
            f"it the servers {', '.join(wanted)}"
            + (f" (missing: {', '.join(missing)})" if missing else "")
            + (f" (not assigned: {', '.join(extra)})" if extra else "")
            + "; refusing it (apply qborg to the admin qube so both have the same settings, "
              "and update qborg there if it predates several servers)")
    named = bool(bundle.get("copies"))
    for name, entry in copies.items():
        _check_copy_matches(entry, copy_settings(settings, name), vm,
                            f" of copy {name!r}" if named else "")
    return bundle


def _check_copy_matches(entry, settings, vm, where):
    server = vm_server(settings, vm)
    expected = {"repository": repository_url(server, vm), "remote_path": server["remote_path"]}
    for field, value in expected.items():
        if entry[field] != value:
            raise QborgBundleError(
                f"bundle field {field!r}{where} is {entry[field]!r}, but this qube's pillar says "
                f"{value!r}; refusing it (apply qborg to the admin qube so both have the same "
                f"settings, and check it was not tampered with)")
    host, key = entry["known_hosts"].split()[0], " ".join(entry["known_hosts"].split()[1:3])
    if host != known_hosts_host(server):
        raise QborgBundleError(
            f"bundle field 'known_hosts'{where} names {host!r}, not this qube's server "
            f"{known_hosts_host(server)!r}; refusing it")
    if settings["server"]["host_key"] and key != settings["server"]["host_key"]:
        raise QborgBundleError(
            f"bundle field 'known_hosts'{where} carries another host key than "
            f"{settings['server']['field']}:host_key pins for {known_hosts_host(server)}; "
            f"refusing it")


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
