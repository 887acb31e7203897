"""Qube definitions: what it takes to recreate a configured VM (class,
template, label, the properties set explicitly, features, tags, firewall
rules), recorded in dom0 from dom0's own tools, checked strictly wherever
it is read (the admin qube, an import, `qborg recreate`: _qborg_recreate
turns it into the qvm-* commands that rebuild the qube).

A definition travels from dom0 through the admin qube (a lesser domain)
back to dom0 as commands a user runs there, so every field is held to
qubesd's own rules (qubes-core-admin: qubes/vm/qubesvm.py, qubes/vm/
__init__.py, qubes/firewall.py, qubes/api/admin.py) or stricter.
"""

import ipaddress
import json
import os
import re

from _qborg_base import QborgConfigError, atomic_write, read_text
from _qborg_settings import valid_qube_name

DEFINITIONS_KEY = "qube_definitions"
DEFINITIONS_FILE = "qubes.json"
# qubes-core-admin qubes/app.py: the labels every Qubes system has
LABELS = ("red", "orange", "yellow", "green", "gray", "blue", "purple", "black")
CLASSES = ("AppVM", "DispVM", "StandaloneVM", "TemplateVM")

_INT = r"[1-9][0-9]{0,6}"
_BOOL = r"True|False"
# the properties worth recreating, each with the values it may take (a full
# match); VM-valued ones take a qube name, "" for none
PROPERTY_VALUES = {
    "autostart": _BOOL, "debug": _BOOL, "include_in_backups": _BOOL,
    "provides_network": _BOOL, "template_for_dispvms": _BOOL,
    "memory": _INT, "vcpus": _INT, "qrexec_timeout": _INT, "shutdown_timeout": _INT,
    "maxmem": r"0|" + _INT,
    "virt_mode": r"hvm|pv|pvh",
    # a name never starts with "-" (no option for a qvm-* tool); kernelopts
    # may, it follows "--" (but is never "--" alone, which argparse drops)
    "kernel": r"(?:[A-Za-z0-9._+][A-Za-z0-9._+-]{0,127})?",
    "kernelopts": r"(?!--\Z)[\x20-\x7E]{0,512}",
    "default_user": r"[A-Za-z0-9_+,.][A-Za-z0-9_+,.-]{0,31}",
}
VM_PROPERTIES = ("audiovm", "default_dispvm", "guivm", "management_dispvm", "netvm")
RECORDED = tuple(sorted(set(PROPERTY_VALUES) | set(VM_PROPERTIES)))

# names never start with "-" (nor a service's, after "service."): one could
# pass for an option of qvm-features, qvm-service or qvm-tags; a value may,
# it follows "--", but is never "--" alone (argparse drops it: a get, not a set)
FEATURE_NAME = re.compile(r"(?!service\.-)[a-zA-Z0-9_.][a-zA-Z0-9_.-]{0,127}")
FEATURE_VALUE = re.compile(r"(?!--\Z)[\x20-\x7E]{0,4096}")
TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")
# what Qubes sets itself: tags from qvm-create and the gui/audio/relay
# extensions (qubes/api/admin.py, qubes/ext/{gui,audio,relay}.py), features
# the qube reports about itself or Qubes derives (qubes/ext/core_features.py,
# services.py, supported_features.py, windows.py)
OWN_TAG_PREFIXES = ("created-by-", "disp-created-by-", "guivm-", "audiovm-", "relayvm-")
OWN_FEATURE_PREFIXES = ("supported-service.", "supported-feature.", "supported-rpc.",
                        "os-", "boot-mode.")
OWN_FEATURES = ("os", "qrexec", "gui", "gui-emulated", "vmexec", "qubes-agent-version",
                "servicevm", "anon-timezone", "rpc-clipboard", "apparmor",
                "updates-available", "last-updates-check")

# qubes/firewall.py: the characters a rule option and a comment may hold
RULE_CHARS = re.compile(r"[A-Za-z0-9:;,./_\[\]-]{1,256}")
COMMENT_CHARS = re.compile(r"[A-Za-z0-9:;,./_\[\] -]{1,256}")
HOSTNAME = re.compile(r"[a-z0-9._-]{1,253}")
RULE_FIELDS = ("action", "dsthost", "proto", "dstports", "icmptype", "specialtarget", "comment")
MAX_RULES = 512


def definitions_path(settings_path):
    """Where the admin qube keeps the definitions: beside its settings."""
    return os.path.join(os.path.dirname(settings_path), DEFINITIONS_FILE)


class FieldError(QborgConfigError):
    """A field of a definition that fails its check (FIELD, WHY)."""

    def __init__(self, field, why, fix):
        super().__init__(f"{field}: {why}; refused: {fix}")
        self.field, self.why = field, why


def _refuse(field, why, fix="record it again in dom0 (apply qborg to dom0)"):
    raise FieldError(field, why, fix)


def _full(pattern, value):
    return isinstance(value, str) and re.fullmatch(pattern, value) is not None


def _qube_ref(value, field, allow_dom0=False):
    """A VM-valued property: '' (none) or a qube name."""
    if value == "" or (allow_dom0 and value == "dom0") or (
            isinstance(value, str) and valid_qube_name(value)):
        return value
    _refuse(field, "not a qube name")
    return None


# ------------------------------------------------------------------ checking


def check_rule(untrusted, field):
    """One firewall rule (a mapping of qubes/firewall.py's fields), checked."""
    if not isinstance(untrusted, dict) or set(untrusted) - set(RULE_FIELDS):
        _refuse(field, f"a rule has only the fields {', '.join(RULE_FIELDS)}")
    rule = {}
    for key, value in untrusted.items():
        pattern = COMMENT_CHARS if key == "comment" else RULE_CHARS
        if not isinstance(value, str) or not pattern.fullmatch(value):
            _refuse(f"{field}:{key}", "characters qubesd does not allow in a firewall rule")
    if untrusted.get("action") not in ("accept", "drop"):
        _refuse(f"{field}:action", "must be accept or drop")
    rule["action"] = untrusted["action"]
    proto = untrusted.get("proto")
    if proto is not None:
        if proto not in ("tcp", "udp", "icmp"):
            _refuse(f"{field}:proto", "must be tcp, udp or icmp")
        rule["proto"] = proto
    if "dsthost" in untrusted:
        rule["dsthost"] = _dsthost(untrusted["dsthost"], f"{field}:dsthost")
    if "dstports" in untrusted:
        ports = untrusted["dstports"]
        if proto not in ("tcp", "udp") or not re.fullmatch(r"[0-9]{1,5}(-[0-9]{1,5})?", ports):
            _refuse(f"{field}:dstports", "a port or a range, with proto tcp or udp")
        low, _sep, high = ports.partition("-")
        if int(low) > int(high or low) or int(high or low) > 65535:
            _refuse(f"{field}:dstports", "ports 0-65535, the lower first")
        rule["dstports"] = str(int(low)) if not high or int(low) == int(high) \
            else f"{int(low)}-{int(high)}"
    if "icmptype" in untrusted:
        if proto != "icmp" or not re.fullmatch(r"[0-9]{1,3}", untrusted["icmptype"]) or \
                int(untrusted["icmptype"]) > 255:
            _refuse(f"{field}:icmptype", "a number 0-255, with proto icmp")
        rule["icmptype"] = str(int(untrusted["icmptype"]))
    if "specialtarget" in untrusted:
        if untrusted["specialtarget"] != "dns":
            _refuse(f"{field}:specialtarget", "only dns")
        rule["specialtarget"] = "dns"
    if "comment" in untrusted:
        rule["comment"] = untrusted["comment"]
    return rule


def _dsthost(value, field):
    """An IPv4 or IPv6 network (with its prefix length) or a host name."""
    try:
        network = ipaddress.ip_network(value, strict=False)
    except ValueError:
        network = None
    if network is not None and re.fullmatch(r"[0-9a-fA-F:.]+(/[0-9]{1,3})?", value):
        if "/" not in value:
            return f"{value}/{network.max_prefixlen}"
        return value
    if "/" in value or not HOSTNAME.fullmatch(value):
        _refuse(field, "an IP address or network, or a host name of a-z 0-9 . _ -")
    return value


def check_property(base, name, value):
    """One property of the definition BASE (qube_definitions:VM), checked."""
    if name in VM_PROPERTIES:
        return _qube_ref(value, f"{base}:properties:{name}",
                         allow_dom0=name in ("guivm", "audiovm"))
    if name not in PROPERTY_VALUES:
        _refuse(f"{base}:properties:{name}",
                f"not a property qborg recreates ({', '.join(RECORDED)})")
    if not _full(PROPERTY_VALUES[name], value):
        _refuse(f"{base}:properties:{name}", "not a value qubesd takes for it (nor one that "
                "starts with -)")
    return value


def check_feature(base, name, value):
    if not isinstance(name, str) or not FEATURE_NAME.fullmatch(name):
        shown = isinstance(name, str) and re.fullmatch(r"[\x21-\x7E]{1,128}", name)
        _refuse(f"{base}:features:{name}" if shown else f"{base}:features",
                "a feature name of a-z A-Z 0-9 _ . - that does not start with - (nor its "
                "service name)")
    if not isinstance(value, str) or not FEATURE_VALUE.fullmatch(value):
        _refuse(f"{base}:features:{name}", "a value of printable ASCII on one line, "
                "at most 4096 characters, not -- alone")
    return value


def check_tag(base, tag):
    if not isinstance(tag, str) or not TAG.fullmatch(tag) or tag.startswith(OWN_TAG_PREFIXES):
        _refuse(f"{base}:tags", "a tag of A-Z a-z 0-9 _ - that does not start with - and "
                "Qubes does not set itself")
    return tag


def check_definition(vm, untrusted):
    """A qube's definition, checked field by field (errors name
    qube_definitions:VM:FIELD); the checked copy."""
    base = f"{DEFINITIONS_KEY}:{vm}"
    if not valid_qube_name(vm):
        _refuse(base, "not a qube name")
    if not isinstance(untrusted, dict):
        _refuse(base, "not a mapping")
    unknown = set(untrusted) - {"class", "label", "template", "properties", "features", "tags",
                                "firewall"}
    if unknown:
        _refuse(f"{base}:{sorted(unknown)[0]}", "not a field of a qube definition")
    out = {}
    if untrusted.get("class") not in CLASSES:
        _refuse(f"{base}:class", f"one of {', '.join(CLASSES)}")
    out["class"] = untrusted["class"]
    if untrusted.get("label") not in LABELS:
        _refuse(f"{base}:label", f"one of Qubes' labels ({', '.join(LABELS)})")
    out["label"] = untrusted["label"]
    template = untrusted.get("template")
    if out["class"] in ("AppVM", "DispVM"):
        if not isinstance(template, str) or not valid_qube_name(template):
            _refuse(f"{base}:template", "an AppVM's template must be a qube name")
        out["template"] = template
    elif template is not None:
        _refuse(f"{base}:template", f"a {out['class']} has no template")
    props = untrusted.get("properties", {})
    if not isinstance(props, dict):
        _refuse(f"{base}:properties", "not a mapping")
    out["properties"] = {name: check_property(base, name, props[name]) for name in sorted(props)}
    features = untrusted.get("features", {})
    if not isinstance(features, dict) or len(features) > 512:
        _refuse(f"{base}:features", "not a mapping (of at most 512)")
    out["features"] = {name: check_feature(base, name, features[name])
                       for name in sorted(features)}
    tags = untrusted.get("tags", [])
    if not isinstance(tags, list) or len(tags) > 256:
        _refuse(f"{base}:tags", "not a list (of at most 256)")
    out["tags"] = sorted({check_tag(base, tag) for tag in tags})
    rules = untrusted.get("firewall")
    if rules is not None:
        if not isinstance(rules, list) or len(rules) > MAX_RULES:
            _refuse(f"{base}:firewall", f"a list of at most {MAX_RULES} rules, or null")
        rules = [check_rule(rule, f"{base}:firewall:{i}") for i, rule in enumerate(rules)]
    out["firewall"] = rules
    return out


def check_definitions(untrusted, vms=None):
    """{VM: definition}, every one checked; VMS: the configured ones, the
    only ones a definition may be for."""
    if not isinstance(untrusted, dict):
        _refuse(DEFINITIONS_KEY, "not a mapping of qube names")
    out = {}
    for vm in sorted(untrusted):
        if vms is not None and vm not in vms:
            _refuse(f"{DEFINITIONS_KEY}:{vm}", "not a VM under qborg:vms")
        out[vm] = check_definition(vm, untrusted[vm])
    return out


def definitions_text(definitions):
    return json.dumps(definitions, indent=2, sort_keys=True, ensure_ascii=True) + "\n"


def store_definitions(definitions, settings_path, owner=None, test=False):
    """Keep checked DEFINITIONS beside the settings (mode 0644, the settings
    file's owner); True if the file changed (or would, under test)."""
    path = definitions_path(settings_path)
    text = definitions_text(definitions)
    if read_text(path) == text:
        return False
    if not test:
        atomic_write(path, text, 0o644, owner)
    return True


def read_definitions(path):
    """The definitions the admin qube keeps ({} when none), checked again."""
    try:
        with open(path, encoding="utf-8") as handle:
            untrusted = json.load(handle)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise QborgConfigError(f"{path}: not readable JSON ({exc}); refused: apply qborg to "
                               "dom0 to record the definitions again") from None
    return check_definitions(untrusted)


# ------------------------------------------------- recording (dom0's own tools)

PREFS_LINE = re.compile(r"(\S+) +([-DU])(?:  (.*))?")


def explicit_properties(prefs_listing):
    """{property: value} of what ``qvm-prefs VM`` lists as set (``-``), not
    default (``D``); a VM property that is none prints ``None``."""
    found = {}
    for line in prefs_listing.splitlines():
        match = PREFS_LINE.fullmatch(line.rstrip("\n"))
        if match and match.group(2) == "-":
            found[match.group(1)] = match.group(3) or ""
    return found


def parse_raw_rule(text, field="firewall"):
    """A rule of ``qvm-firewall --raw VM list`` (qubesadmin's Rule.rule:
    ``action=accept proto=tcp dst4=1.2.3.4/32 dstports=443-443 comment=...``)
    as a mapping of qubes/firewall.py's fields; None for one that expires
    (a temporary rule is not part of the qube's definition)."""
    options, _sep, comment = text.partition("comment=")
    fields = {}
    for option in options.split():
        key, eq, value = option.partition("=")
        key = "dsthost" if key in ("dst4", "dst6") else key
        if not eq or key in fields or key not in RULE_FIELDS + ("expire",):
            _refuse(field, f"qvm-firewall printed a rule qborg does not know: {option!r}",
                    "report it")
        fields[key] = value
    if comment:
        fields["comment"] = comment
    if "expire" in fields:
        return None
    return fields


def own_feature(name):
    """A feature Qubes sets itself, or the qube reports about itself."""
    return name in OWN_FEATURES or name.startswith(OWN_FEATURE_PREFIXES)


def _leave_out_bad_fields(vm, definition, warnings):
    """Drop the features, tags and (not VM-valued) properties of DEFINITION
    that fail their check, a warning for each in WARNINGS; the fields a
    qube cannot be rebuilt without (class, label, template, netvm, ...,
    the firewall: a rule left out would open it) stay, to be checked whole."""
    base = f"{DEFINITIONS_KEY}:{vm}"
    checks = (("property", definition["properties"],
               lambda n, v: check_property(base, n, v) if n in PROPERTY_VALUES else v),
              ("feature", definition["features"], lambda n, v: check_feature(base, n, v)),
              ("tag", definition["tags"], lambda n, v: check_tag(base, n)))
    for what, items, check in checks:
        for name in list(items):
            try:
                check(name, items[name] if isinstance(items, dict) else None)
            except FieldError as exc:
                if isinstance(items, dict):
                    del items[name]
                else:
                    items.remove(name)
                warnings.append(
                    f"WARNING: {vm}'s {what} {name} is left out of its definition "
                    f"({exc.field}: {exc.why}): `qborg recreate {vm}` will not set it; "
                    f"set it by hand after a recreate, or give it a value qborg records")


def definition_from_tools(vm, prefs_listing, features, tags, raw_rules, warnings=None):
    """The definition of VM from dom0's tools' outputs: the ``qvm-prefs VM``
    listing, {feature: value}, the ``qvm-tags VM list`` lines and the
    ``qvm-firewall --raw VM list`` lines; checked before it leaves dom0.
    WARNINGS, a list: a feature, tag or property that fails its check is
    left out and a warning naming it added, instead of refusing them all."""
    prefs = explicit_properties(prefs_listing)
    klass = prefs.get("klass") or next(
        (m.group(3) for m in map(PREFS_LINE.fullmatch, prefs_listing.splitlines())
         if m and m.group(1) == "klass"), None)
    definition = {"class": klass, "label": prefs.get("label")}
    if "template" in prefs:
        definition["template"] = prefs["template"]
    definition["properties"] = {
        name: ("" if name in VM_PROPERTIES and prefs[name] == "None" else prefs[name])
        for name in RECORDED if name in prefs}
    definition["features"] = {k: v for k, v in features.items() if not own_feature(k)}
    definition["tags"] = [t for t in tags if t and not t.startswith(OWN_TAG_PREFIXES)]
    rules = [parse_raw_rule(line, f"{DEFINITIONS_KEY}:{vm}:firewall")
             for line in raw_rules if line.strip()]
    rules = [rule for rule in rules if rule is not None]
    # no firewall.xml: Qubes' default, one rule that accepts everything
    definition["firewall"] = None if rules == [{"action": "accept"}] else rules
    if warnings is not None:
        _leave_out_bad_fields(vm, definition, warnings)
    return check_definition(vm, definition)
