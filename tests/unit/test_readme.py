"""The README names the test behind each attack refused and fault survived
(Security): every test it names exists."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]


def test_every_test_the_readme_names_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    named = set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))
    assert len(named) > 20
    missing = []
    for path, name in sorted(named):
        source = REPO / path
        if not source.exists() or not re.search(rf"^def {name}\(", source.read_text(
                encoding="utf-8"), re.M):
            missing.append(f"{path}::{name}")
    assert missing == []


def test_every_test_file_the_readme_names_exists():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    files = set(re.findall(r"`(tests/[\w/]+\.py)`", text))
    assert [f for f in sorted(files) if not (REPO / f).exists()] == []


# --- qubesctl's output ---------------------------------------------------------------
#
# qubesctl prints a qube's Salt output only with --show-output; without it
# just `VM: OK` or `VM: ERROR (exit code N, details in
# /var/log/qubes/mgmt-VM.log)` (qubes-mgmt-salt: qubessalt/__init__.py). dom0's
# own run (no target option: dom0 only, or dom0 first) is printed either way
# (qubesctl: `qubesctl --dom0-only` on the terminal). So every README command
# that runs states in a qube carries --show-output, before the Salt function:
# qubesctl's own options end there, what follows goes to Salt.

QUBESCTL_RE = re.compile(
    r"qubesctl(?P<options>(?:\s+--?[\w-]+(?:=[^\s`]+)?)*)\s+(?P<function>[a-z_]+\.[a-z_.]+)"
    r"(?P<args>[^`\n#]*)")
# qubesctl's options that target qubes besides dom0 (qubesctl: --targets, --all,
# --templates, --app, --standalones)
TARGETING = ("--targets", "--all", "--templates", "--app", "--standalones")
RUNS_STATES = ("state.apply", "state.highstate", "state.sls")


def qubesctl_commands(text):
    """(section, options, function, args) of every qubesctl command in TEXT,
    in code blocks and in inline code (one may wrap across lines)."""
    headings = [(m.start(), m.group(1)) for m in re.finditer(r"^## (.+)$", text, re.M)]
    found = []
    for match in QUBESCTL_RE.finditer(text):
        section = [title for start, title in headings if start < match.start()][-1:]
        found.append((section[0] if section else "", match.group("options").split(),
                      match.group("function"), match.group("args").split()))
    return found


def needs_show_output(options, function):
    targets_qubes = any(opt.split("=", 1)[0] in TARGETING for opt in options)
    return targets_qubes and function in RUNS_STATES


def test_the_command_parser_sees_what_needs_show_output():
    """The rule below can fail: a command that applies states in a qube is
    caught without --show-output, or with it after the Salt function."""
    text = ("    sudo qubesctl --targets=vm-a state.apply qborg\n"
            "and `qubesctl --show-output --skip-dom0\n  --targets=vm-b state.apply qborg`,"
            " `sudo qubesctl --all state.highstate --show-output`, and dom0 only:\n"
            "    sudo qubesctl top.enable qborg pillar=True   # a comment\n"
            "    sudo qubesctl state.apply qborg\n")
    commands = qubesctl_commands(text)
    assert [(o, f) for _s, o, f, _a in commands] == [
        (["--targets=vm-a"], "state.apply"),
        (["--show-output", "--skip-dom0", "--targets=vm-b"], "state.apply"),
        (["--all"], "state.highstate"), ([], "top.enable"), ([], "state.apply")]
    assert [needs_show_output(o, f) and "--show-output" not in o
            for _s, o, f, _a in commands] == [True, False, True, False, False]
    assert [a for _s, _o, _f, a in commands][2] == ["--show-output"]


def test_every_qubesctl_command_that_applies_a_qube_shows_its_output():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    commands = qubesctl_commands(text)
    assert sum(needs_show_output(o, f) for _s, o, f, _a in commands) >= 10
    misplaced = [(s, o, f, a) for s, o, f, a in commands if "--show-output" in a]
    assert misplaced == []
    hidden = {(section, " ".join(options + [function] + args))
              for section, options, function, args in commands
              if needs_show_output(options, function) and "--show-output" not in options}
    assert hidden == set()


def test_troubleshooting_names_the_log_and_show_output():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Troubleshooting\n", 1)[1].split("\n## ", 1)[0]
    entry = next(item for item in section.split("\n- ") if "nothing happened" in item)
    assert "--show-output" in entry
    assert "/var/log/qubes/mgmt-" in entry
