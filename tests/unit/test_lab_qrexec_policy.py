"""The lab's qrexec broker reads dom0's policy as Qubes does.

Its parser (lab/bin/qrexec-broker) follows qubes-core-qrexec's
qrexec/policy/parser.py: a line that parser refuses fails the load of the
whole policy, and Qubes' policy daemon then denies every call ("error
loading policy"), whatever the other lines and files allow. The cases below
are ones where that parser was run on the same lines.
"""

import importlib.machinery
import importlib.util
import json
import pathlib

import pytest

BROKER = pathlib.Path(__file__).resolve().parents[2] / "lab" / "bin" / "qrexec-broker"


def _load_broker():
    name = "qrexec_broker_under_test"
    loader = importlib.machinery.SourceFileLoader(name, str(BROKER))
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader(name, loader))
    loader.exec_module(module)
    return module


broker = _load_broker()


@pytest.fixture
def lab(tmp_path):
    """A lab directory: dom0's record of qubes, a registry, a policy.d."""
    record = tmp_path / "qubes" / "dom0" / "qubes.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"qubes": {
        "dom0": {"klass": "AdminVM", "netvm": None},
        "backup-admin": {"klass": "AppVM", "tags": ["qborg-admin"]},
        "vm-personal": {"klass": "AppVM"},
        "vm-work": {"klass": "AppVM"},
        "debian-12-xfce": {"klass": "TemplateVM"},
    }}))
    policy = tmp_path / "policy.d"
    policy.mkdir()
    registry = {"dir": str(tmp_path), "policy_dir": str(policy),
                "qubes": {q: {} for q in ("backup-admin", "vm-personal", "vm-work")}}

    class Lab:
        policy_dir = policy

        @staticmethod
        def write(name, text):
            (policy / name).write_text(text)

        @staticmethod
        def decide(source, target, service="qborg.GetBundle", argument=""):
            return broker.decide(registry, service, argument, source, target)

    return Lab


def one_rule(line):
    (rule,) = broker.parse_policy_text("# header\n" + line + "\n")
    return rule


# --- the grammar: what Qubes' parser accepts ----------------------------------------

@pytest.mark.parametrize("line", [
    "qborg.GetBundle * vm-personal backup-admin allow",
    "qborg.GetBundle +arg vm-personal backup-admin allow",
    "qborg.GetBundle + @anyvm @anyvm deny notify=no",
    "* * @anyvm @adminvm deny",
    # `*` is a token of the R4.2 format too (WildcardVM, dom0 included)
    "qborg.GetBundle * * backup-admin allow",
    "qborg.GetBundle * vm-personal * deny",
    # a token without `@` is a qube name; the parser checks no more
    "qborg.GetBundle * $anyvm backup-admin allow",
    "qborg.GetBundle * vm#1 backup-admin allow",
    # @type: and @tag: take any value
    "qborg.GetBundle * @type:Bogus @anyvm deny",
    "qubes.Filecopy * @tag:work @type:AppVM ask default_target=vm-work",
    "qubes.OpenURL * vm-personal @dispvm allow target=@dispvm:disp-tpl",
    "qubes.OpenURL * @dispvm:@tag:x @default allow target=vm-work user=root autostart=no",
    "qubes.VMShell * dom0 vm-work allow",
])
def test_lines_qubes_accepts(line):
    rule = one_rule(line)
    assert rule.lineno == 2


@pytest.mark.parametrize("line,why", [
    # a `#` after a rule is no comment: it is one more field, a parameter
    # without `=`
    ("qborg.GetBundle * vm-personal backup-admin allow # ok",
     "invalid action parameter syntax: '#'"),
    ("qborg.GetBundle * vm-personal backup-admin allow #ok=1", "invalid parameters for action"),
    ("qborg.GetBundle * @default backup-admin allow", "invalid source token: '@default'"),
    ("qborg.GetBundle * @foo backup-admin allow", "invalid source token: '@foo'"),
    ("qborg.GetBundle * @tag: @anyvm deny", "invalid empty @tag: token"),
    ("qborg.GetBundle * vm-personal backup-admin", "wrong number of fields"),
    ("qborg.GetBundle * vm-personal backup-admin permit", "invalid action: permit"),
    ("qborg.GetBundle arg vm-personal backup-admin allow", "does not start with +"),
    ("* +arg @anyvm @anyvm deny", "only * argument allowed for * service"),
    ("qborg/GetBundle * vm-personal backup-admin allow", "contains invalid characters"),
    ("qborg.GetBundle * vm-personal backup-admin deny target=vm-work",
     "invalid parameters for action Deny"),
    ("qborg.GetBundle * vm-personal backup-admin allow default_target=vm-work",
     "invalid parameters for action Allow"),
    ("qborg.GetBundle * vm-personal backup-admin allow user=a user=b", "given twice"),
    ("qborg.GetBundle * vm-personal backup-admin allow notify=maybe", "only 'yes' or 'no'"),
    ("qborg.GetBundle * vm-personal backup-admin allow target=@anyvm",
     "invalid redirect token: '@anyvm'"),
    ("qborg.GetBundle * vm-personal backup-admin allow target=*", "invalid redirect token"),
    ("qborg.GetBundle * vm-personal backup-admin allow,user=root", "invalid action"),
    ("qborg.GetBundle * vm-personal @default allow", "must specify target="),
    ("!include-dir", "invalid number of params"),
    ("!foo bar", "invalid directive"),
])
def test_lines_qubes_refuses(line, why):
    with pytest.raises(broker.PolicySyntaxError) as error:
        one_rule(line)
    assert why in str(error.value)
    assert str(error.value).startswith("<buffer>:2: ")


# --- one refused line: no call passes (must-show 6) -------------------------------------

def test_a_line_qubes_refuses_makes_the_broker_refuse_every_call(lab):
    lab.write("70-qborg.policy", "qborg.GetBundle * vm-personal backup-admin allow\n"
                                 "qborg.GetBundle * @anyvm @anyvm deny\n")
    assert lab.decide("vm-personal", "backup-admin") == ("backup-admin", None)
    # a file of its own, sorted after qborg's, with an inline comment
    lab.write("80-local.policy", "# mine\n"
                                 "qubes.Filecopy * vm-work vm-personal allow  # files\n")
    target, why = lab.decide("vm-personal", "backup-admin")
    assert target is None
    assert why.startswith("error loading policy: ")
    assert why.endswith("80-local.policy:2: invalid action parameter syntax: '#'")
    # the file's good line is no more in force than the other file's
    assert lab.decide("vm-work", "vm-personal", service="qubes.Filecopy")[0] is None
    (lab.policy_dir / "80-local.policy").unlink()
    assert lab.decide("vm-personal", "backup-admin") == ("backup-admin", None)


def test_a_file_name_qubes_refuses_refuses_every_call(lab):
    lab.write("70-qborg.policy", "qborg.GetBundle * vm-personal backup-admin allow\n")
    lab.write("80-Local.policy", "")
    target, why = lab.decide("vm-personal", "backup-admin")
    assert target is None and "invalid filename" in why
    # what is not a policy file is not read at all
    (lab.policy_dir / "80-Local.policy").rename(lab.policy_dir / "80-Local.policy.rpmsave")
    lab.write(".80-local.policy", "not a rule\n")
    assert lab.decide("vm-personal", "backup-admin") == ("backup-admin", None)


def test_a_broken_include_refuses_every_call(lab):
    include = lab.policy_dir / "include"
    include.mkdir()
    (include / "qborg-vms").write_text("qborg.GetBundle * vm-personal backup-admin allow\n")
    lab.write("70-qborg.policy", "!include include/qborg-vms\n"
                                 "qborg.GetBundle * @anyvm @anyvm deny\n")
    assert lab.decide("vm-personal", "backup-admin") == ("backup-admin", None)
    assert lab.decide("vm-work", "backup-admin")[0] is None
    lab.write("70-qborg.policy", "!include include/missing\n")
    target, why = lab.decide("vm-personal", "backup-admin")
    assert target is None and "70-qborg.policy:1: not a file" in why


# --- evaluation ----------------------------------------------------------------------

def test_first_match_in_file_order_across_files_sorted_by_name(lab):
    lab.write("70-b.policy", "qborg.GetBundle * vm-personal backup-admin allow\n")
    lab.write("30-a.policy", "qborg.GetBundle * vm-personal @anyvm deny\n")
    target, why = lab.decide("vm-personal", "backup-admin")
    assert target is None and why.endswith("30-a.policy:1")
    (lab.policy_dir / "30-a.policy").rename(lab.policy_dir / "90-a.policy")
    assert lab.decide("vm-personal", "backup-admin") == ("backup-admin", None)


def test_wildcard_matches_dom0_and_anyvm_does_not(lab):
    lab.write("70-x.policy", "qborg.X * @anyvm backup-admin deny\n"
                             "qborg.X * * backup-admin allow\n")
    assert lab.decide("vm-work", "backup-admin", "qborg.X")[0] is None
    assert lab.decide("dom0", "backup-admin", "qborg.X") == ("backup-admin", None)


def test_type_and_tag_tokens_read_dom0s_record(lab):
    lab.write("70-x.policy", "qborg.X * @tag:qborg-admin @type:AppVM allow\n"
                             "qborg.Y * @anyvm @type:TemplateVM allow\n")
    assert lab.decide("backup-admin", "vm-work", "qborg.X") == ("vm-work", None)
    assert lab.decide("vm-personal", "vm-work", "qborg.X")[0] is None
    assert lab.decide("vm-work", "debian-12-xfce", "qborg.Y") == ("debian-12-xfce", None)
    assert lab.decide("vm-work", "vm-personal", "qborg.Y")[0] is None


def test_a_target_dom0_does_not_have_is_default(lab):
    # a typo'd target is @default to Qubes: a rule for @default may redirect it
    lab.write("70-x.policy", "qborg.X * vm-work @default allow target=backup-admin\n")
    assert lab.decide("vm-work", "vm-typo", "qborg.X") == ("backup-admin", None)
    assert lab.decide("vm-work", "vm-personal", "qborg.X")[0] is None


def test_allow_without_a_target_is_denied(lab):
    lab.write("70-x.policy", "qborg.X * vm-work @anyvm allow\n")
    target, why = lab.decide("vm-work", "@default", "qborg.X")
    assert target is None and "no target" in why


def test_argument_must_match_exactly(lab):
    lab.write("70-x.policy", "qborg.X +a vm-work backup-admin allow\n"
                             "qborg.X + vm-personal backup-admin allow\n")
    assert lab.decide("vm-work", "backup-admin", "qborg.X", "a")[0] == "backup-admin"
    assert lab.decide("vm-work", "backup-admin", "qborg.X", "b")[0] is None
    assert lab.decide("vm-personal", "backup-admin", "qborg.X")[0] == "backup-admin"
    assert lab.decide("vm-personal", "backup-admin", "qborg.X", "a")[0] is None
