"""The README and the pages under docs/ it links to: every test they name
exists (docs/security.md names the test behind each attack refused and fault
survived), every qubesctl command that applies a qube shows its output, the
README keeps qusal's shape and every page it links to is there."""

import pathlib
import re

REPO = pathlib.Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
# pages other parts of the project write: the README links to them, and they
# must exist like every other page it links to
RESERVED_PAGES = ("docs/architecture.md", "docs/removing.md")


def read(relative):
    return (REPO / relative).read_text(encoding="utf-8")


def documentation():
    """{path: text} of the README and every page under docs/."""
    pages = {"README.md": read("README.md")}
    for page in sorted(DOCS.glob("*.md")):
        pages[page.relative_to(REPO).as_posix()] = page.read_text(encoding="utf-8")
    return pages


def named_tests(text):
    return set(re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", text))


def test_security_names_the_test_behind_each_attack_and_fault():
    text = read("docs/security.md")
    for table in ("\n## Attacks refused\n", "\n## Faults survived\n"):
        section = text.split(table, 1)[1].split("\n## ", 1)[0]
        rows = [row for row in section.splitlines() if row.startswith("| ")][2:]
        assert rows and all(named_tests(row) or "`tests/" in row for row in rows), table
    assert len(named_tests(text)) > 20


def test_every_test_the_docs_name_exists():
    named = set().union(*(named_tests(text) for text in documentation().values()))
    assert len(named) > 20
    missing = []
    for path, name in sorted(named):
        source = REPO / path
        if not source.exists() or not re.search(rf"^def {name}\(", source.read_text(
                encoding="utf-8"), re.M):
            missing.append(f"{path}::{name}")
    assert missing == []


def test_every_test_file_the_docs_name_exists():
    files = set()
    for text in documentation().values():
        files |= set(re.findall(r"`(tests/[\w/]+\.py)`", text))
    assert files
    assert [f for f in sorted(files) if not (REPO / f).exists()] == []


# --- qubesctl's output ---------------------------------------------------------------
#
# qubesctl prints a qube's Salt output only with --show-output; without it
# just `VM: OK` or `VM: ERROR (exit code N, details in
# /var/log/qubes/mgmt-VM.log)` (qubes-mgmt-salt: qubessalt/__init__.py). dom0's
# own run (no target option: dom0 only, or dom0 first) is printed either way
# (qubesctl: `qubesctl --dom0-only` on the terminal). So every command in the
# README and docs/ that runs states in a qube carries --show-output, before the
# Salt function: qubesctl's own options end there, what follows goes to Salt.

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
    applying = misplaced = 0
    hidden = set()
    for page, text in documentation().items():
        commands = qubesctl_commands(text)
        applying += sum(needs_show_output(o, f) for _s, o, f, _a in commands)
        misplaced += sum("--show-output" in a for _s, _o, _f, a in commands)
        hidden |= {(page, section, " ".join(options + [function] + args))
                   for section, options, function, args in commands
                   if needs_show_output(options, function)
                   and "--show-output" not in options}
    assert applying >= 10
    assert misplaced == 0
    assert hidden == set()


def test_the_readme_itself_applies_qubes_with_their_output_shown():
    commands = qubesctl_commands(read("README.md"))
    assert sum(needs_show_output(o, f) and "--show-output" in o
               for _s, o, f, _a in commands) >= 5


def test_troubleshooting_names_the_log_and_show_output():
    text = read("docs/troubleshooting.md")
    entry = next(item for item in text.split("\n- ") if "nothing happened" in item)
    assert "--show-output" in entry
    assert "/var/log/qubes/mgmt-" in entry


# --- the README's shape (qusal's) and its links ------------------------------------

README_MAX_LINES = 330
QUICK_START_BY_LINE = 80


def test_the_readme_is_short_with_a_quick_start_near_the_top():
    lines = read("README.md").splitlines()
    assert len(lines) <= README_MAX_LINES
    quick = [n for n, line in enumerate(lines, 1) if re.match(r"^## Quick start\b", line)]
    assert quick and quick[0] <= QUICK_START_BY_LINE
    body = "\n".join(lines[quick[0]:quick[0] + 40])
    assert "make demo" in body
    assert re.search(r"qubesctl --show-output --targets=\S+ state\.apply qborg", body)


def test_the_readme_has_qusals_sections():
    titles = re.findall(r"^## (.+)$", read("README.md"), re.M)
    for title in ("Table of Contents", "Description", "Quick start", "Installation",
                  "Usage", "Access Control", "Pillar", "Documentation"):
        assert title in titles


def links(text):
    """Relative link targets in TEXT, as (path, anchor)."""
    found = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        found.append((path, anchor))
    return found


def slug(title):
    """GitHub's anchor of a heading."""
    title = re.sub(r"[^\w\- ]", "", title.strip().lower())
    return title.replace(" ", "-")


def anchors(text):
    return {slug(title) for title in re.findall(r"^#+ (.+)$", text, re.M)}


def test_every_docs_page_the_readme_links_exists():
    linked = {path for path, _a in links(read("README.md")) if path.startswith("docs/")}
    assert set(RESERVED_PAGES) <= linked
    assert {"docs/security.md", "docs/maintenance.md", "docs/relay.md",
            "docs/troubleshooting.md", "docs/development.md"} <= linked
    assert [page for page in sorted(linked) if not (REPO / page).is_file()] == []


def test_every_docs_page_is_linked_from_the_readme():
    linked = {path for path, _a in links(read("README.md"))}
    pages = {page.relative_to(REPO).as_posix() for page in DOCS.glob("*.md")}
    assert sorted(pages - linked) == []


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    pages = documentation()
    broken = []
    for page, text in pages.items():
        base = (REPO / page).parent
        for path, anchor in links(text):
            target = (base / path).resolve() if path else REPO / page
            if not target.exists():
                broken.append(f"{page}: {path}")
                continue
            relative = target.relative_to(REPO).as_posix() if path else page
            if anchor and relative.endswith(".md") and relative not in RESERVED_PAGES:
                if anchor not in anchors(target.read_text(encoding="utf-8")):
                    broken.append(f"{page}: {path}#{anchor}")
    assert broken == []
