"""The policy file the dom0 part writes, checked against the qrexec policy
grammar of Qubes R4.1/R4.2 (/etc/qubes/policy.d/*.policy), as documented
for qubes-core-qrexec ("Multifile policy") and enforced by its parser:

    SERVICE  ARGUMENT  SOURCE  DESTINATION  ACTION  [PARAM=VALUE ...]

- SERVICE is `*` or a name of letters, digits, `-`, `.`, `_`;
- ARGUMENT is `*` or `+` followed by those characters (and `+`); a `*`
  service takes only a `*` argument;
- SOURCE: a qube name, @adminvm, @anyvm, @tag:TAG, @type:TYPE,
  @dispvm:NAME, @dispvm:@tag:TAG;
- DESTINATION: those, @default and @dispvm (never `*`: the old format's
  wildcard is not a token of this one);
- ACTION allow (params target=, user=, notify=, autostart=), deny
  (notify=), ask (target=, default_target=, user=, notify=, autostart=);
  target= and default_target= name a qube, @adminvm, @dispvm or
  @dispvm:NAME; notify and autostart are yes or no; no param twice; an
  allow towards @default needs target=;
- a line starting with `#` is a comment (no inline comments), `!include`,
  `!include-dir`, `!include-service`, `!compat-4.0` are directives.
"""

import re

import pytest

QUBE_NAME = re.compile(r"^[a-zA-Z][a-zA-Z0-9_.-]{0,30}$")
SERVICE = re.compile(r"^[A-Za-z0-9_.-]+$")
ARGUMENT = re.compile(r"^\+[A-Za-z0-9_.+-]*$")
TAG = re.compile(r"^[A-Za-z0-9_.-]+$")
VM_TYPES = {"AppVM", "TemplateVM", "StandaloneVM", "DispVM", "AdminVM"}
PARAMS = {
    "allow": {"target", "user", "notify", "autostart"},
    "deny": {"notify"},
    "ask": {"target", "default_target", "user", "notify", "autostart"},
}
DIRECTIVES = {"!include": 1, "!include-dir": 1, "!include-service": 3, "!compat-4.0": 0}


class PolicySyntaxError(ValueError):
    pass


def qube_token(token, where):
    """A token in SOURCE ('source'), DESTINATION ('target') or target=
    ('redirect') position; raises PolicySyntaxError when it is not one."""
    if token == "dom0":  # the parser's alias of @adminvm
        token = "@adminvm"
    if not token.startswith("@"):
        if not QUBE_NAME.match(token):
            raise PolicySyntaxError(f"{where} {token!r} is not a qube name or @token")
        return token
    exact = {"source": {"@adminvm", "@anyvm"},
             "target": {"@adminvm", "@anyvm", "@default", "@dispvm"},
             "redirect": {"@adminvm", "@dispvm"}}[where]
    if token in exact:
        return token
    if token.startswith("@dispvm:@tag:") and where != "redirect":
        if TAG.match(token[len("@dispvm:@tag:"):]):
            return token
    elif token.startswith("@dispvm:"):
        if QUBE_NAME.match(token[len("@dispvm:"):]):
            return token
    elif token.startswith("@tag:") and where != "redirect":
        if TAG.match(token[len("@tag:"):]):
            return token
    elif token.startswith("@type:") and where != "redirect":
        if token[len("@type:"):] in VM_TYPES:
            return token
    raise PolicySyntaxError(f"invalid {where} token {token!r}")


def parse_rule(line):
    fields = line.split()
    if len(fields) < 5:
        raise PolicySyntaxError(f"wrong number of fields: {line!r}")
    service, argument, source, target, action, *params = fields
    if service != "*" and not SERVICE.match(service):
        raise PolicySyntaxError(f"service {service!r} contains invalid characters")
    if argument != "*":
        if not ARGUMENT.match(argument):
            raise PolicySyntaxError(f"argument {argument!r} must be * or start with +")
        if service == "*":
            raise PolicySyntaxError("only * argument allowed for * service")
    source = qube_token(source, "source")
    target = qube_token(target, "target")
    if action not in PARAMS:
        raise PolicySyntaxError(f"invalid action: {action}")
    options = {}
    for param in params:
        if "=" not in param:
            raise PolicySyntaxError(f"invalid action parameter syntax: {param!r}")
        key, value = param.split("=", 1)
        if key in options:
            raise PolicySyntaxError(f"parameter given twice: {key!r}")
        if key not in PARAMS[action]:
            raise PolicySyntaxError(f"invalid parameter {key!r} for action {action}")
        if key in ("notify", "autostart") and value not in ("yes", "no"):
            raise PolicySyntaxError(f"{key!r} is {value!r}, but can be only 'yes' or 'no'")
        if key in ("target", "default_target"):
            value = qube_token(value, "redirect")
        options[key] = value
    if target == "@default" and action == "allow" and "target" not in options:
        raise PolicySyntaxError("allow action for @default rule must specify target= option")
    return {"service": service, "argument": argument, "source": source, "target": target,
            "action": action, "params": options}


def parse_policy(text):
    """The rules of a policy file, in order; PolicySyntaxError names the line."""
    rules = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            if "#" in line:
                raise PolicySyntaxError("inline comments are not allowed")
            if line.startswith("!"):
                directive, *params = line.split()
                if DIRECTIVES.get(directive) != len(params):
                    raise PolicySyntaxError(f"invalid directive {line!r}")
                continue
            rules.append(parse_rule(line))
        except PolicySyntaxError as error:
            raise PolicySyntaxError(f"line {number}: {error}") from None
    return rules


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
    rules = parse_policy(written_policy)
    assert [(r["service"], r["source"], r["target"], r["action"]) for r in rules] == [
        ("qborg.GetBundle", "vm-personal", "backup-admin", "allow"),
        ("qborg.GetBundle", "vm-work", "backup-admin", "allow"),
        ("qborg.GetBundle", "@anyvm", "@anyvm", "deny"),
        ("qborg.UpdateSettings", "@anyvm", "@anyvm", "deny"),
        ("qborg.SshRelay", "@anyvm", "@anyvm", "deny"),
    ]


def test_the_written_policy_has_no_wildcard_qube_and_ends_with_the_deny(written_policy):
    rules = parse_policy(written_policy)
    assert all("*" not in (r["source"], r["target"]) for r in rules)
    getbundle = [r for r in rules if r["service"] == "qborg.GetBundle"]
    assert getbundle[-1]["action"] == "deny"
    assert (getbundle[-1]["source"], getbundle[-1]["target"]) == ("@anyvm", "@anyvm")
    assert all(r["action"] == "allow" and r["target"] == "backup-admin" for r in getbundle[:-1])
    assert all(r["argument"] == "*" and not r["params"] for r in rules)


# --- the parser rejects what the grammar rejects ----------------------------------------

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
    ("qborg.GetBundle * * backup-admin allow", "not a qube name"),
    ("qborg.GetBundle * vm-personal * allow", "not a qube name"),
    ("qborg.GetBundle * $anyvm backup-admin allow", "not a qube name"),
    ("qborg.GetBundle * @default backup-admin allow", "invalid source token"),
    ("qborg.GetBundle * vm-personal backup-admin", "wrong number of fields"),
    ("qborg.GetBundle * vm-personal backup-admin permit", "invalid action"),
    ("qborg.GetBundle arg vm-personal backup-admin allow", "must be * or start with +"),
    ("* +arg @anyvm @anyvm deny", "only * argument"),
    ("qborg/GetBundle * vm-personal backup-admin allow", "invalid characters"),
    ("qborg.GetBundle * vm-personal backup-admin deny target=vm-work", "invalid parameter"),
    ("qborg.GetBundle * vm-personal backup-admin allow default_target=vm-work",
     "invalid parameter"),
    ("qborg.GetBundle * vm-personal backup-admin allow user=a user=b", "given twice"),
    ("qborg.GetBundle * vm-personal backup-admin allow notify=maybe", "only 'yes' or 'no'"),
    ("qborg.GetBundle * vm-personal backup-admin allow target=@anyvm", "invalid redirect"),
    ("qborg.GetBundle * vm-personal backup-admin allow,user=root", "invalid action"),
    ("qborg.GetBundle * vm-personal @default allow", "must specify target="),
    ("qborg.GetBundle * @tag: @anyvm deny", "invalid source token"),
    ("qborg.GetBundle * @type:Bogus @anyvm deny", "invalid source token"),
    ("qborg.GetBundle * vm-personal backup-admin allow # ok", "inline comments"),
    ("!include-dir", "invalid directive"),
])
def test_malformed_lines_are_rejected(line, why):
    with pytest.raises(PolicySyntaxError, match=re.escape(why)) as error:
        parse_policy("# header\n" + line + "\n")
    assert "line 2" in str(error.value)


def test_a_broken_template_would_be_caught(written_policy):
    """The same checks fail on a file that used the old R4.0 wildcard."""
    broken = written_policy.replace("@anyvm @anyvm deny", "* * deny")
    with pytest.raises(PolicySyntaxError):
        parse_policy(broken)
