"""What qubesd keeps and checks, for the lab's qvm-* stand-ins (lab/bin/qvm-prefs).

The record is ``LAB/qubes/dom0/qubes.json`` (what /var/lib/qubes/qubes.xml is):
per qube its class (``klass``), ``label``, ``template``, ``netvm`` (a name or
null; ``netvm_is_default``), ``provides_network``, the other properties set
explicitly (``prefs``), ``features``, ``tags`` and ``firewall`` (a list of
rules; absent: Qubes' default, one rule ``action=accept``).

The checks follow qubes-core-admin: property setters (qubes/vm/qubesvm.py,
qubes/vm/__init__.py, qubes/vm/mix/net.py), labels (qubes/app.py), tags
(qubes/vm/__init__.py Tags.validate_tag), features (qubes/api/admin.py
vm_feature_set), firewall rules (qubes/firewall.py, and qubesadmin's
qubesadmin/firewall.py for the text the tools print), names
(qubes/vm/__init__.py validate_name). Only the standard library is used.
"""

import fcntl
import json
import os
import re
import socket
import string
import tempfile

LAB = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
QUBES_JSON = os.path.join(LAB, "qubes", "dom0", "qubes.json")
QUBE_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}$")
FEATURE_RE = re.compile(r"^[a-zA-Z0-9_.-]+\Z")
FEATURE_VALUE_RE = re.compile(r"^[\x20-\x7E]*\Z")
DEFAULT_NETVM = "sys-firewall"
# qubes/app.py: the labels every Qubes system has, in index order
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
# the classes the lab can create (qvm-create --class)
CLASSES = ("AppVM", "StandaloneVM", "TemplateVM")
TEMPLATE_BASED = ("AppVM", "DispVM")


class Usage(Exception):
    """An error qubesadmin's argument parser reports (exit 2)."""


class Runtime(Exception):
    """An error qubesd returns, which the tools report (exit 1)."""


# --- the record -------------------------------------------------------------------

class Qubes:
    """dom0's qubes, read under a lock and written back atomically."""

    def __init__(self, write=False):
        self.write = write
        self._lock = None
        self.data = None

    def __enter__(self):
        lock_path = QUBES_JSON + ".lock"
        self._lock = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self._lock, fcntl.LOCK_EX if self.write else fcntl.LOCK_SH)
        try:
            with open(QUBES_JSON, encoding="utf-8") as handle:
                self.data = json.load(handle)
        except (OSError, ValueError) as error:
            raise Runtime("cannot read the lab's qubes (%s): %s" % (QUBES_JSON, error)) from None
        return self

    def __exit__(self, exc_type, *exc):
        try:
            if self.write and exc_type is None:
                fd, tmp = tempfile.mkstemp(dir=os.path.dirname(QUBES_JSON), prefix=".qubes-")
                with os.fdopen(fd, "w", encoding="utf-8") as handle:
                    json.dump(self.data, handle, indent=2, sort_keys=True)
                    handle.write("\n")
                    handle.flush()
                    os.fsync(handle.fileno())
                os.chmod(tmp, 0o644)
                os.replace(tmp, QUBES_JSON)
        finally:
            os.close(self._lock)
        return False

    def qube(self, name):
        qube = self.data["qubes"].get(name) if QUBE_RE.match(name or "") else None
        if qube is None:
            raise Usage("no such domain: %r" % (name,))
        qube.setdefault("features", {})
        return qube


def validate_name(name):
    """qubes/vm/__init__.py validate_name (QubesValueError)."""
    if not isinstance(name, str) or not name:
        raise Runtime("VM name cannot be empty")
    if len(name) > 31:
        raise Runtime("VM name must be shorter than 32 characters")
    if not QUBE_RE.match(name):
        raise Runtime("VM name contains illegal characters")
    if name in ("none", "default", "dom0") or name.endswith("-dm"):
        raise Runtime("VM name cannot be %r or end with -dm" % name)


# --- properties -----------------------------------------------------------------

def _positive(value):
    number = int(value)
    if number <= 0:
        raise ValueError("must be positive")
    return number


def _non_negative(value):
    number = int(value)
    if number < 0:
        raise ValueError("must be positive or zero")
    return number


def _bool(value):
    lowered = str(value).lower()
    if lowered in ("0", "no", "false", "off"):
        return False
    if lowered in ("1", "yes", "true", "on"):
        return True
    raise ValueError("Invalid literal for boolean property: %r" % value)


def _virt_mode(value):
    value = str(value).lower()
    if value not in ("hvm", "pv", "pvh"):
        raise ValueError("Invalid virtualization mode, supported values: hvm, pv, pvh")
    return value


def _kernel(value):
    if "/" in value:
        raise ValueError("Kernel name cannot contain '/'")
    return value


def _kernelopts(value):
    if len(value) > 512:
        raise ValueError("Kernelopts value too long (512 chars max)")
    return value


def _default_user(value):
    allowed = string.ascii_letters + string.digits + "_-+,."
    if not all(c in allowed for c in value):
        raise ValueError("Username can contain only those characters: " + allowed)
    return value


def _default_netvm(data, qube):
    if qube.get("klass") in ("TemplateVM", "AdminVM") or qube.get("provides_network"):
        return None
    return data.get("default_netvm", DEFAULT_NETVM)


# name: (setter, default(data, qube), classes that have it or None for all
# but AdminVM); VM-valued properties have setter "vm" and are checked apart
PROPERTIES = {
    "audiovm": ("vm", lambda d, q: "dom0", None),
    "autostart": (_bool, lambda d, q: False, None),
    "debug": (_bool, lambda d, q: False, None),
    "default_dispvm": ("vm", lambda d, q: None, None),
    "default_user": (_default_user, lambda d, q: "user", None),
    "guivm": ("vm", lambda d, q: "dom0", None),
    "include_in_backups": (_bool, lambda d, q: True, None),
    "kernel": (_kernel, lambda d, q: "6.6.63-1.qubes.fc37", None),
    "kernelopts": (_kernelopts, lambda d, q: "", None),
    "management_dispvm": ("vm", lambda d, q: None, None),
    "maxmem": (_non_negative, lambda d, q: 4000, None),
    "memory": (_positive, lambda d, q: 400, None),
    "qrexec_timeout": (_positive, lambda d, q: 60, None),
    "shutdown_timeout": (_positive, lambda d, q: 60, None),
    "template_for_dispvms": (_bool, lambda d, q: False, ("AppVM",)),
    "vcpus": (_positive, lambda d, q: 2, None),
    "virt_mode": (_virt_mode, lambda d, q: "pvh", None),
}
# kept at the top of a qube's record (the lab's other parts read them)
RECORD_KEYS = ("klass", "label", "netvm", "provides_network", "template")
READ_ONLY = ("klass", "name")
VM_VALUED = ("audiovm", "default_dispvm", "guivm", "management_dispvm", "netvm", "template")


def property_names(qube):
    """The properties a qube of its class has (qvm-prefs lists them)."""
    klass = qube.get("klass")
    if klass == "AdminVM":
        return ["klass", "label", "name"]
    names = ["klass", "label", "name", "netvm", "provides_network"] + [
        name for name, (_s, _d, classes) in PROPERTIES.items()
        if classes is None or klass in classes]
    if klass in TEMPLATE_BASED:
        names.append("template")
    return sorted(names)


def get_property(data, name, qube_name, prop):
    """(value, is_default) of one property; value None for an empty VM property."""
    qube = data["qubes"][qube_name]
    if prop not in property_names(qube):
        raise Usage("no such property: %r" % prop)
    if prop == "name":
        return qube_name, False
    if prop == "klass":
        return qube.get("klass"), True
    if prop == "label":
        return qube.get("label") or "red", False
    if prop == "template":
        return qube.get("template"), False
    if prop == "netvm":
        if qube.get("netvm_is_default", False):
            return _default_netvm(data, qube), True
        return qube.get("netvm"), False
    if prop == "provides_network":
        if "provides_network" in qube:
            return bool(qube["provides_network"]), False
        return False, True
    prefs = qube.get("prefs") or {}
    if prop in prefs:
        return prefs[prop], False
    return PROPERTIES[prop][1](data, qube), True


def shown(value):
    """A property's value as qvm-prefs prints it (str(value))."""
    return str(value)


def _vm_value(data, qube_name, prop, value):
    """A VM-valued property: '' (none) or an existing qube, checked as qubesd does."""
    if value in ("", None):
        if prop == "template":
            raise Runtime("template cannot be empty")
        return None
    target = data["qubes"].get(value)
    if target is None:
        raise Runtime("no such domain: %r" % value)
    if prop == "netvm":
        if value == qube_name:
            raise Runtime("Loops in network are unsupported")
        if not target.get("provides_network"):
            raise Runtime("VM %s does not provide network" % value)
    if prop == "template" and target.get("klass") != "TemplateVM":
        raise Runtime("%s is not a TemplateVM" % value)
    if prop in ("default_dispvm", "management_dispvm") and not (
            target.get("prefs") or {}).get("template_for_dispvms"):
        raise Runtime("Cannot set invalid property to %s, qube %r has template_for_dispvms "
                      "set to False" % (prop, value))
    return value


def set_property(data, qube_name, prop, value):
    """Set a property as qubesd does, or raise Runtime (qubesd's refusal)."""
    qube = data["qubes"][qube_name]
    if prop not in property_names(qube):
        raise Usage("no such property: %r" % prop)
    if prop in READ_ONLY:
        raise Runtime("property %s is read-only" % prop)
    if prop == "label":
        if value not in LABELS and not (value.startswith("label-") or value.isdigit()):
            raise Runtime("Label %r does not exist" % value)
        if value not in LABELS:
            index = int(value.split("-", 1)[-1]) if value.split("-", 1)[-1].isdigit() else 0
            if not 1 <= index <= len(LABELS):
                raise Runtime("Label %r does not exist" % value)
            value = LABELS[index - 1]
        qube["label"] = value
        return
    if prop in VM_VALUED:
        value = _vm_value(data, qube_name, prop, value)
        if prop == "netvm":
            qube.update(netvm=value, netvm_is_default=False)
        elif prop == "template":
            qube["template"] = value
        else:
            qube.setdefault("prefs", {})[prop] = value
        return
    if prop == "provides_network":
        try:
            qube["provides_network"] = _bool(value)
        except ValueError as error:
            raise Runtime(str(error)) from None
        return
    try:
        checked = PROPERTIES[prop][0](value)
    except ValueError as error:
        raise Runtime("Invalid value %r for property %r of %s: %s"
                      % (value, prop, qube_name, error)) from None
    qube.setdefault("prefs", {})[prop] = checked


def reset_property(data, qube_name, prop):
    qube = data["qubes"][qube_name]
    if prop not in property_names(qube):
        raise Usage("no such property: %r" % prop)
    if prop in READ_ONLY or prop in ("label", "template"):
        raise Runtime("property %s has no default" % prop)
    if prop == "netvm":
        qube.update(netvm=_default_netvm(data, qube), netvm_is_default=True)
    elif prop == "provides_network":
        qube.pop("provides_network", None)
    else:
        (qube.get("prefs") or {}).pop(prop, None)


# --- tags and features ------------------------------------------------------------

def validate_tag(tag):
    """qubes/vm/__init__.py Tags.validate_tag (QubesInvalidTagError)."""
    if not tag:
        raise Runtime("tag cannot be empty")
    if not all(c in string.ascii_letters + string.digits + "-_" for c in tag):
        raise Runtime("disallowed characters")


def validate_feature(name, value=None):
    """qubes/api/admin.py vm_feature_set (ProtocolError)."""
    if not FEATURE_RE.match(name or ""):
        raise Runtime("feature name contains illegal characters")
    if value is not None and not FEATURE_VALUE_RE.match(value):
        raise Runtime("%s value contains illegal characters" % name)


# --- firewall ---------------------------------------------------------------------

RULE_ORDER = ("action", "proto", "dsthost", "dstports", "icmptype", "specialtarget",
              "expire", "comment")
RULE_SAFE = string.ascii_letters + string.digits + ":;,./-_[]"
COMMENT_SAFE = RULE_SAFE + " "


def _dsthost(value):
    """qubes/firewall.py DstHost: (type, value with prefix length)."""
    if value.count("/") > 1:
        raise ValueError("Too many /: " + value)
    host, _slash, length = value.partition("/")
    for family, kind, bits in ((socket.AF_INET6, "dst6", 128), (socket.AF_INET, "dst4", 32)):
        try:
            socket.inet_pton(family, host)
        except OSError:
            continue
        if kind == "dst4" and host.count(".") != 3:
            raise ValueError("Invalid number of dots in IPv4 address")
        if length and not length.isdigit():
            raise ValueError("bad prefix length")
        prefix = int(length) if length else bits
        if prefix > bits:
            raise ValueError("netmask for %s must be <= %d" % (
                "IPv6" if bits == 128 else "IPv4", bits))
        return kind, "%s/%d" % (host, prefix)
    if length:
        raise ValueError("Invalid IP address: " + host)
    if not host or not all(c in string.ascii_lowercase + string.digits + "-._" for c in host):
        raise ValueError("Invalid hostname")
    return "dsthost", host


def make_rule(fields):
    """A rule from its fields (action, proto, dsthost, ...), checked as qubesd
    and qubesadmin check it; ValueError names what is wrong."""
    fields = dict(fields)
    for key in ("dst4", "dst6"):
        if key in fields:
            fields["dsthost"] = fields.pop(key)
    unknown = set(fields) - set(RULE_ORDER)
    if unknown:
        raise ValueError("Unknown rule elements: %r" % sorted(unknown))
    for key, value in fields.items():
        safe = COMMENT_SAFE if key == "comment" else RULE_SAFE
        if not all(c in safe for c in str(value)):
            raise ValueError("strange characters in rule")
    rule = {}
    if fields.get("action") not in ("accept", "drop"):
        raise ValueError("missing action=" if "action" not in fields else fields["action"])
    rule["action"] = fields["action"]
    if "proto" in fields:
        if fields["proto"] not in ("tcp", "udp", "icmp"):
            raise ValueError(fields["proto"])
        rule["proto"] = fields["proto"]
    if "dsthost" in fields:
        rule["dsthost"] = _dsthost(fields["dsthost"])[1]
    if "dstports" in fields:
        if rule.get("proto") not in ("tcp", "udp"):
            raise ValueError("dstports valid only for 'tcp' and 'udp' protocols")
        ports = str(fields["dstports"]).split("-")
        if len(ports) > 2 or not all(p.isdigit() for p in ports):
            raise ValueError(fields["dstports"])
        low, high = int(ports[0]), int(ports[-1])
        if not (0 <= low <= 65535 and 0 <= high <= 65535):
            raise ValueError("Ports out of range")
        if low > high:
            raise ValueError("Invalid port range")
        rule["dstports"] = str(low) if low == high else "%d-%d" % (low, high)
    if "icmptype" in fields:
        if rule.get("proto") != "icmp":
            raise ValueError("icmptype valid only for 'icmp' protocol")
        value = str(fields["icmptype"])
        if len(value) > 3 or not value.isdigit() or int(value) > 255:
            raise ValueError("bad ICMP type")
        rule["icmptype"] = str(int(value))
    if "specialtarget" in fields:
        if fields["specialtarget"] != "dns":
            raise ValueError(fields["specialtarget"])
        rule["specialtarget"] = "dns"
    if "expire" in fields:
        if not str(fields["expire"]).isdigit():
            raise ValueError("bad expiration time")
        rule["expire"] = str(int(fields["expire"]))
    if "comment" in fields:
        rule["comment"] = str(fields["comment"])
    return rule


def parse_rule(text):
    """A rule of qubesd's API text (``action=accept proto=tcp dst4=... comment=...``)."""
    options, _sep, comment = text.partition("comment=")
    fields = {}
    for option in options.strip().split(" "):
        if not option:
            continue
        key, eq, value = option.partition("=")
        if not eq:
            raise ValueError("invalid rule option: %r" % option)
        if key in fields or (key in ("dst4", "dst6") and "dsthost" in fields):
            raise ValueError("Option '%s' already set" % key)
        fields["dsthost" if key in ("dst4", "dst6") else key] = value
    if comment:
        fields["comment"] = comment
    return make_rule(fields)


def rule_text(rule):
    """The rule as ``qvm-firewall --raw VM list`` prints it (qubesadmin's
    Rule.rule: fixed order, ports as a range, a host as dst4/dst6/dsthost;
    0.0.0.0/0 and ::/0 match every host and are left out)."""
    parts = []
    for key in RULE_ORDER:
        value = rule.get(key)
        if value is None:
            continue
        if key == "dsthost":
            kind, value = _dsthost(value)
            if kind != "dsthost" and value.endswith("/0"):
                continue
            parts.append("%s=%s" % (kind, value))
        elif key == "dstports":
            low, _sep, high = value.partition("-")
            parts.append("dstports=%s-%s" % (low, high or low))
        else:
            parts.append("%s=%s" % (key, value))
    return " ".join(parts)


def firewall_rules(qube):
    """The qube's rules; Qubes' default (no firewall.xml) is one accept rule."""
    rules = qube.get("firewall")
    return [dict(r) for r in rules] if rules is not None else [{"action": "accept"}]
