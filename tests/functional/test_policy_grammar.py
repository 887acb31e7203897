"""The policy file the dom0 part writes, checked twice:

1. Qubes' own checks: the file must load in qubes-core-qrexec's parser
   (qrexec/policy/parser.py, the R4.1/R4.2 format of
   /etc/qubes/policy.d/*.policy). A line that parser refuses fails the load
   of the whole policy, and every qrexec call is then denied. The parser
   used is the lab broker's (lab/bin/qrexec-broker), which follows
   parser.py check for check:

       SERVICE  ARGUMENT  SOURCE  DESTINATION  ACTION  [PARAM=VALUE ...]

   - SERVICE is `*` or letters, digits, `-`, `.`, `_`; ARGUMENT is `*` or
     `+` and those characters (and `+`); a `*` service takes only a `*`
     argument;
   - SOURCE: `*`, @adminvm, @anyvm, @tag:X, @type:X, @dispvm:X,
     @dispvm:@tag:X, or any token without `@` (a qube name, not checked
     further); DESTINATION: those, @default and @dispvm;
   - ACTION allow (target=, user=, notify=, autostart=), deny (notify=), ask
     (target=, default_target=, user=, notify=, autostart=); target= and
     default_target= name a qube, @adminvm, @dispvm or @dispvm:X; notify and
     autostart are yes or no; no parameter twice; an allow towards @default
     needs target=;
   - only a line starting with `#` is a comment: a `#` after a rule is one
     more field, a parameter without `=`, and refused; `!include`,
     `!include-dir`, `!include-service`, `!compat-4.0` are directives.

2. qborg's own lint, stricter than Qubes and not Qubes' rule: no `*` as a
   source or destination (qborg names each qube, and ends with an explicit
   @anyvm deny), a token without `@` must be a valid qube name (Qubes'
   parser would take `$anyvm` or `vm#1` as one and match nothing), @type:
   one of Qubes' classes, @tag: a plain tag.
"""

import importlib.machinery
import importlib.util
import pathlib
import re

import pytest

BROKER = pathlib.Path(__file__).resolve().parents[2] / "lab" / "bin" / "qrexec-broker"


def _load_broker():
    name = "qrexec_broker_grammar"
    loader = importlib.machinery.SourceFileLoader(name, str(BROKER))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


qubes = _load_broker()
QubesSyntaxError = qubes.PolicySyntaxError

QUBE_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}$")
TAG = re.compile(r"^[A-Za-z0-9_.-]+$")
VM_TYPES = {"AppVM", "TemplateVM", "StandaloneVM", "DispVM", "AdminVM"}


class LintError(ValueError):
    """A line Qubes loads but qborg's lint refuses."""


def lint_token(token, where):
    """qborg's rules for a SOURCE, DESTINATION or redirect Qubes accepted."""
    if token == "*":
        raise LintError(f"{where} `*`: qborg names each qube (or @anyvm for its deny)")
    if not token.startswith("@"):
        if token != "dom0" and not QUBE_NAME.match(token):
            raise LintError(f"{where} {token!r} is not a valid qube name")
    elif token.startswith("@type:") and token[len("@type:"):] not in VM_TYPES:
        raise LintError(f"{where} {token!r}: no such class of qube")
    elif token.startswith(("@tag:", "@dispvm:@tag:")) and not TAG.match(token.split(":")[-1]):
        raise LintError(f"{where} {token!r}: not a plain tag")


def lint(rules):
    for rule in rules:
        try:
            lint_token(rule.source, "source")
            lint_token(rule.target, "target")
            for key in ("target", "default_target"):
                if key in rule.params:
                    lint_token(rule.params[key], key + "=")
        except LintError as error:
            raise LintError(f"line {rule.lineno}: {error}") from None
    return rules


def parse_policy(text):
    """The rules of a policy file as Qubes loads them (QubesSyntaxError,
    FILE:LINE, where Qubes refuses), then qborg's lint (LintError)."""
    rules = lint(qubes.parse_policy_text(text))
    return [{"service": r.service or "*", "argument": r.argument or "*", "source": r.source,
             "target": r.target, "action": r.action, "params": r.params, "lineno": r.lineno}
            for r in rules]


# --- the file the dom0 part writes -------------------------------------------------

def _args(state, fun):
    args = {}
    for item in state[fun]:
        if isinstance(item, dict):
            args.update(item)
    return args


def _write_policy(loaders_for, tmp_path, pillar=None):
    """The policy file as the dom0 part's own file.managed state writes it
    (every argument from the rendered state; only the path is changed)."""
    dom0 = loaders_for("dom0")
    high = dom0.modules.state.show_sls("qborg", pillar=pillar)
    args = _args(high["qborg-dom0-policy"], "file")
    for key in ("require", "order"):
        args.pop(key, None)
    args["name"] = str(tmp_path / "policy.d" / "70-qborg.policy")
    ret = dom0.states.file.managed(**args)
    assert ret.result is True, ret.comment
    return (tmp_path / "policy.d" / "70-qborg.policy").read_text()


@pytest.fixture
def written_policy(loaders_for, tmp_path):
    text = _write_policy(loaders_for, tmp_path)
    assert "vm-personal backup-admin allow" in text and "vm-work backup-admin allow" in text
    return text


def test_the_written_policy_with_a_relay_parses_as_r42_policy(loaders_for, tmp_path):
    pillar = {"qborg": {"relay_vm": "sys-qborg-relay",
                        "vms": {"vm-vault": {"via": "relay"}}}}
    rules = parse_policy(_write_policy(loaders_for, tmp_path, pillar))
    relay = [(r["source"], r["target"], r["action"]) for r in rules
             if r["service"] == "qborg.SshRelay"]
    assert relay == [("vm-vault", "sys-qborg-relay", "allow"), ("@anyvm", "@anyvm", "deny")]
    assert all("*" not in (r["source"], r["target"]) for r in rules)


def test_the_written_policy_parses_as_r42_policy(written_policy):
    """Qubes loads the file, qborg's lint passes it, the rules in order."""
    rules = parse_policy(written_policy)
    assert [(r["service"], r["source"], r["target"], r["action"]) for r in rules] == [
        ("qborg.GetBundle", "vm-personal", "backup-admin", "allow"),
        ("qborg.GetBundle", "vm-work", "backup-admin", "allow"),
        ("qborg.GetBundle", "@anyvm", "@anyvm", "deny"),
        ("qborg.UpdateSettings", "@anyvm", "@anyvm", "deny"),
        ("qborg.SshRelay", "@anyvm", "@anyvm", "deny"),
    ]


def test_the_written_policy_has_no_wildcard_qube_and_ends_with_the_deny(written_policy):
    """qborg's own rules for its file (Qubes would allow `*`)."""
    rules = parse_policy(written_policy)
    assert all("*" not in (r["source"], r["target"]) for r in rules)
    getbundle = [r for r in rules if r["service"] == "qborg.GetBundle"]
    assert getbundle[-1]["action"] == "deny"
    assert (getbundle[-1]["source"], getbundle[-1]["target"]) == ("@anyvm", "@anyvm")
    assert all(r["action"] == "allow" and r["target"] == "backup-admin" for r in getbundle[:-1])
    assert all(r["argument"] == "*" and not r["params"] for r in rules)


# --- what Qubes refuses, and what only qborg's lint does ----------------------------------

@pytest.mark.parametrize("line", [
    "qborg.GetBundle * vm-personal backup-admin allow",
    "qborg.GetBundle +arg vm-personal backup-admin allow",
    "qborg.GetBundle + @anyvm @anyvm deny notify=no",
    "* * @anyvm @adminvm deny",
    "qubes.Filecopy * @tag:work @type:AppVM ask default_target=vm-work",
    "qubes.OpenURL * vm-personal @dispvm allow target=@dispvm:disp-tpl",
    "qubes.OpenURL * @dispvm:@tag:x @default allow target=vm-work user=root autostart=no",
    "qubes.VMShell * dom0 vm-work allow",
])
def test_valid_lines_parse(line):
    assert parse_policy(line + "\n")


@pytest.mark.parametrize("line,why", [
    ("qborg.GetBundle * @default backup-admin allow", "invalid source token"),
    ("qborg.GetBundle * vm-personal backup-admin", "wrong number of fields"),
    ("qborg.GetBundle * vm-personal backup-admin permit", "invalid action"),
    ("qborg.GetBundle arg vm-personal backup-admin allow", "does not start with +"),
    ("* +arg @anyvm @anyvm deny", "only * argument"),
    ("qborg/GetBundle * vm-personal backup-admin allow", "invalid characters"),
    ("qborg.GetBundle * vm-personal backup-admin deny target=vm-work", "invalid parameters"),
    ("qborg.GetBundle * vm-personal backup-admin allow default_target=vm-work",
     "invalid parameters"),
    ("qborg.GetBundle * vm-personal backup-admin allow user=a user=b", "given twice"),
    ("qborg.GetBundle * vm-personal backup-admin allow notify=maybe", "only 'yes' or 'no'"),
    ("qborg.GetBundle * vm-personal backup-admin allow target=@anyvm", "invalid redirect"),
    ("qborg.GetBundle * vm-personal backup-admin allow,user=root", "invalid action"),
    ("qborg.GetBundle * vm-personal @default allow", "must specify target="),
    ("qborg.GetBundle * @tag: @anyvm deny", "invalid empty @tag: token"),
    # no inline comments: the `#` is a parameter without `=`
    ("qborg.GetBundle * vm-personal backup-admin allow # ok",
     "invalid action parameter syntax: '#'"),
    ("!include-dir", "invalid number of params"),
])
def test_qubes_refuses_these_lines(line, why):
    """Qubes' parser refuses each: the whole policy fails to load."""
    with pytest.raises(QubesSyntaxError, match=re.escape(why)) as error:
        parse_policy("# header\n" + line + "\n")
    assert ":2: " in str(error.value)


@pytest.mark.parametrize("line,why", [
    ("qborg.GetBundle * * backup-admin allow", "source `*`"),
    ("qborg.GetBundle * vm-personal * allow", "target `*`"),
    ("qborg.GetBundle * $anyvm backup-admin allow", "not a valid qube name"),
    ("qborg.GetBundle * vm#1 backup-admin allow", "not a valid qube name"),
    ("qborg.GetBundle * @type:Bogus @anyvm deny", "no such class"),
    ("qborg.GetBundle * @tag:a/b @anyvm deny", "not a plain tag"),
])
def test_qubes_loads_these_lines_qborgs_lint_refuses_them(line, why):
    """Valid R4.2 policy (Qubes loads it: `*` is its wildcard, a token
    without `@` a qube name, @type:/@tag: take any value), refused by
    qborg's stricter lint only."""
    text = "# header\n" + line + "\n"
    assert qubes.parse_policy_text(text)
    with pytest.raises(LintError, match=re.escape(why)) as error:
        parse_policy(text)
    assert "line 2" in str(error.value)


def test_a_broken_template_would_be_caught(written_policy):
    """qborg's lint fails on a file that used `*` for its deny (Qubes itself
    would load it: `* *` matches every caller, dom0 included)."""
    broken = written_policy.replace("@anyvm @anyvm deny", "* * deny")
    assert qubes.parse_policy_text(broken)
    with pytest.raises(LintError):
        parse_policy(broken)
