"""The `qborg recreate` script: the qvm-* commands that rebuild qubes from
their checked definitions (_qborg_qubes), every value shell-quoted and, where
it could start with "-", after "--"; the qubes created before any other
qube's property names them; the settings that weaken isolation named in a
comment for the user who reads the script before running it in dom0.
"""

import shlex

from _qborg_base import QborgConfigError
from _qborg_qubes import DEFINITIONS_KEY, RULE_FIELDS, VM_PROPERTIES, check_definition


def _rule_arguments(rule):
    return [f"{key}={rule[key]}" for key in RULE_FIELDS if key in rule]


# what a new qube needs before another one may name it: qubesd refuses a netvm
# that does not provide network, a default_dispvm or management_dispvm that is
# no template_for_dispvms (qubes/vm/mix/net.py, qubes/vm/dispvm.py)
FIRST = ("provides_network", "template_for_dispvms")


def recreate_phases(vm, definition):
    """The qvm-* commands that rebuild VM as its definition says, as argv
    lists, in three phases: (the qube, with what makes it a netvm or a
    disposable template), (its other properties: a VM-valued one may name
    another qube the script creates), (its features, services, tags and
    firewall). Each value that could start with "-" follows "--", as
    qubesadmin's tools (argparse) take it: text, never an option."""
    definition = check_definition(vm, definition)
    if definition["class"] != "AppVM":
        raise QborgConfigError(
            f"{DEFINITIONS_KEY}:{vm}:class: {definition['class']}; qborg recreate rebuilds "
            f"AppVMs only: create {vm} by hand (its definition: qborg recreate --json {vm})")
    create = [["qvm-create", "--class", "AppVM", "--template", definition["template"],
               "--label", definition["label"], vm]]
    props = definition["properties"]
    link = []
    for name in sorted(props):
        argv = ["qvm-prefs", vm, "--", name, props[name] if props[name] != "" else "none"]
        (create if name in FIRST else link).append(argv)
    commands = []
    for name, value in definition["features"].items():
        if name.startswith("service.") and value in ("1", ""):
            commands.append(["qvm-service", vm, "--", name[len("service."):],
                             "on" if value else "off"])
        else:
            commands.append(["qvm-features", vm, "--", name, value])
    if definition["tags"]:
        commands.append(["qvm-tags", vm, "add", "--", *definition["tags"]])
    if definition["firewall"] is not None:
        # a new qube has Qubes' default rule (accept all) first: the recorded
        # rules go after it, then it goes
        for rule in definition["firewall"]:
            commands.append(["qvm-firewall", vm, "add", *_rule_arguments(rule)])
        commands.append(["qvm-firewall", vm, "del", "--rule-no", "0"])
    return create, link, commands


def recreate_commands(vm, definition):
    """The qvm-* commands that rebuild VM alone, as argv lists."""
    return [argv for phase in recreate_phases(vm, definition) for argv in phase]


# what weakens a qube's isolation, or its GUI's, if a tampered definition
# planted it: the script names them in a comment for the user who reads it
SECURITY_FEATURES = ("gui-", "audio-")
SECURITY_PROPERTIES = {"guivm": None, "audiovm": None, "management_dispvm": None,
                       "kernel": None, "kernelopts": None, "virt_mode": "pv",
                       "debug": "True"}


def security_relevant(definition):
    """The settings of DEFINITION a user should know they set themselves:
    GUI and audio features (gui-allow-fullscreen, gui-override-redirect,
    ...), the guivm, audiovm or management_dispvm, the kernel and its
    options, pv mode, debug."""
    found = [f"{name}={value}" for name, value in sorted(definition["properties"].items())
             if name in SECURITY_PROPERTIES and SECURITY_PROPERTIES[name] in (None, value)]
    return found + [f"feature {name}={value}" for name, value in definition["features"].items()
                    if name.startswith(SECURITY_FEATURES)]


def referenced_qubes(definition):
    """The other qubes a definition names (template, netvm, ...)."""
    names = {definition.get("template")} | {
        definition["properties"].get(name) for name in VM_PROPERTIES}
    return sorted(n for n in names if n and n != "dom0")


def recreate_script(definitions, vms):
    """A /bin/sh script for dom0 that rebuilds VMS from DEFINITIONS: it
    refuses to start when one of them exists already or a qube they need
    does not, stops at the first failing command (set -eu), and runs
    nothing but qvm-* tools with shell-quoted arguments."""
    missing = [vm for vm in vms if vm not in definitions]
    if missing:
        raise QborgConfigError(
            f"no definition of {', '.join(missing)}: apply qborg to dom0 while the qube "
            "exists, so that it records it, or import an export that holds it")
    plans = {vm: recreate_phases(vm, definitions[vm]) for vm in vms}
    needed = sorted({q for vm in vms for q in referenced_qubes(definitions[vm])} - set(vms))
    q = shlex.quote
    out = ["#!/bin/sh",
           f"# qborg recreate: rebuilds {', '.join(vms)} in dom0 as dom0 recorded "
           f"{'them' if len(vms) > 1 else 'it'}.",
           "# Read it, then run it in dom0: sh FILE. It creates nothing if one of them",
           "# exists already or a qube they need is missing.",
           "set -eu"]
    for vm in vms:
        out.append(f"if qvm-check --quiet {q(vm)} 2>/dev/null; then echo "
                   + q(f"{vm} exists already: nothing was created") + " >&2; exit 1; fi")
    for other in needed:
        out.append(f"if ! qvm-check --quiet {q(other)} 2>/dev/null; then echo "
                   + q(f"{other} does not exist: create or restore it first; nothing was "
                       "created") + " >&2; exit 1; fi")
    flagged = [(vm, security_relevant(definitions[vm])) for vm in vms]
    if any(found for _vm, found in flagged):
        out += ["", "# security-relevant: check that you set these yourself before you run it"]
        out += [f"#   {vm}: {'; '.join(found)}" for vm, found in flagged if found]
    titles = ("the qubes, and what makes one a netvm or a disposable template",
              "their properties (a netvm or default_dispvm may be one created above)",
              "their features, services, tags and firewall")
    for phase, title in enumerate(titles):
        out += ["", f"# {title}"]
        for vm in vms:
            out += [" ".join(q(arg) for arg in argv) for argv in plans[vm][phase]]
    out += ["", "echo " + q(f"recreated {', '.join(vms)}: now apply qborg to them "
                            "and restore their homes")]
    return "\n".join(out) + "\n"
