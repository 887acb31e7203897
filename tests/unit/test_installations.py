"""Several Qubes machines on one server account: qborg:installation names a
machine's authorized_keys block, its keys' lines and its repositories; a
machine never rewrites another's block and refuses a repository (or key)
that is already another's. Unset, everything is as it always was."""

import pytest

import _qborg_base as base_mod
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod
import _qborg_repos as repos
import _qborg_keystore as keystore_mod
import _qborg_export as export_mod
import _qborg_maint as maint_mod
import _qborg_admin as admin

ADMIN_A = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyOfTheDesktop00000000000000000000"
ADMIN_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyOfTheLaptop000000000000000000000"


def settings(merge, installation=None, vms=None, **srv):
    server = {"host": "de1234.rsync.net", "user": "de1234", "provider": "rsync.net"}
    server.update(srv)
    raw = {"server": server, "vms": vms or {"vm-personal": {}, "vm-work": {}}}
    if installation is not None:
        raw["installation"] = installation
    return settings_mod.validate_settings(merge(raw))


def key():
    return " ".join(keystore_mod.generate_ssh_key("x")[1].split()[:2])


def block_lines(s, keys):
    return [repos.vm_authorized_keys_line(s, vm, keys[vm]) for vm in sorted(keys)]


# ------------------------------------------------------------------ the setting


def test_unset_or_empty_is_the_installation_without_a_name(merge):
    for value in (None, ""):
        s = settings(merge, value)
        assert s["installation"] is None and s["server"]["installation"] is None
        assert servers_mod.repository_path(s["server"], "vm-personal") == "qborg/vm-personal"
        assert repos.block_markers(s["installation"]) == ("# BEGIN qborg", "# END qborg")


def test_a_name_namespaces_the_repositories_the_block_and_the_key_comments(merge):
    s = settings(merge, "laptop")
    assert s["installation"] == s["server"]["installation"] == "laptop"
    assert servers_mod.repository_path(s["server"], "vm-personal") == "qborg/laptop/vm-personal"
    assert servers_mod.repository_url(s["server"], "vm-personal") == (
        "ssh://de1234@de1234.rsync.net:22/./qborg/laptop/vm-personal")
    assert repos.alias_repository_url(s["server"], "vm-work") == "ssh://qborg/./qborg/laptop/vm-work"
    vm_key = key()
    assert repos.vm_authorized_keys_line(s, "vm-personal", vm_key) == (
        'restrict,command="borg14 serve --append-only --restrict-to-repository '
        f'qborg/laptop/vm-personal" {vm_key} qborg:laptop:vm-personal')
    assert repos.block_markers("laptop") == ("# BEGIN qborg laptop", "# END qborg laptop")
    # a VM's own repository keeps its path
    own = settings(merge, "laptop", {"vm-personal": {"repository": "ssh://de1234@de1234.rsync.net/./x/p"}})
    assert servers_mod.repository_path(servers_mod.vm_server(own, "vm-personal"),
                                        "vm-personal") == "x/p"


@pytest.mark.parametrize("bad", ["Laptop", "1laptop", "lap top", "laptop\n", "lap_top", "a.b",
                                 "a/b", "x" * 25, "-x", 5, True, ["laptop"]])
def test_a_bad_installation_name_fails_naming_the_field(merge, bad):
    with pytest.raises(base_mod.QborgConfigError, match=r"^qborg:installation: .*laptop"):
        settings(merge, bad)


def test_a_repository_on_the_installations_own_directory_or_above_is_refused(merge):
    for path in ("qborg/laptop", "qborg", "qborg/laptop/"):
        with pytest.raises(base_mod.QborgConfigError,
                           match=r"^qborg:vms:vm-work:repository: .*qborg:installation"):
            settings(merge, "laptop", {"vm-personal": {}, "vm-work": {
                "repository": f"ssh://de1234@de1234.rsync.net/./{path}"}})
    # beside it (another installation's place is checked on the server, at upload)
    settings(merge, "laptop", {"vm-work": {"repository": "ssh://de1234@de1234.rsync.net/./qborg/w"}})


# ------------------------------------------------------- blocks in one file


def account_file(desktop_keys, desktop, laptop=None, laptop_keys=None):
    """An account's authorized_keys as two installations leave it: the user's
    own lines (CRLF and all), both admin keys, the unnamed block of the
    desktop and, if given, the laptop's block."""
    text = (f"{ADMIN_A} desktop-admin\r\n"
            "# a comment of the user's\n"
            f"{ADMIN_B} laptop-admin\n"
            "\n")
    text = repos.render_authorized_keys(text, block_lines(desktop, desktop_keys))
    text += 'command="echo hi" ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQOtherUsersKey user@x\n'
    if laptop is not None:
        text = repos.render_authorized_keys(text, block_lines(laptop, laptop_keys), "laptop")
    return text


def test_each_installation_rewrites_only_its_own_block(merge):
    desktop, laptop = settings(merge), settings(merge, "laptop")
    dk = {"vm-personal": key(), "vm-work": key()}
    lk = {"vm-personal": key(), "vm-work": key()}
    text = account_file(dk, desktop, laptop, lk)
    before, unnamed, after = repos.split_managed_block(text)
    assert unnamed == block_lines(desktop, dk)
    assert repos.split_managed_block(text, "laptop")[1] == block_lines(laptop, lk)
    assert "# BEGIN qborg laptop\n" in after and "# END qborg laptop\n" in after
    # the laptop rotates a key: its block alone changes, the rest byte for byte
    lk2 = dict(lk, **{"vm-work": key()})
    again = repos.render_authorized_keys(text, block_lines(laptop, lk2), "laptop")
    b, _old, a = repos.split_managed_block(text, "laptop")
    b2, new, a2 = repos.split_managed_block(again, "laptop")
    assert (b2, a2) == (b, a) and new == block_lines(laptop, lk2)
    # the desktop (unnamed) drops a VM: the laptop's block stays byte for byte
    fewer = repos.render_authorized_keys(text, block_lines(desktop, {"vm-work": dk["vm-work"]}))
    assert repos.split_managed_block(fewer)[0] == before
    assert repos.split_managed_block(fewer)[2] == after
    assert repos.split_managed_block(fewer, "laptop")[1] == block_lines(laptop, lk)
    assert fewer.count("# BEGIN qborg laptop") == 1
    assert fewer[fewer.index("# BEGIN qborg laptop"):] == text[text.index("# BEGIN qborg laptop"):]
    # and rendering the same again changes nothing for either
    assert repos.render_authorized_keys(text, block_lines(desktop, dk)) == text
    assert repos.render_authorized_keys(text, block_lines(laptop, lk), "laptop") == text


def test_the_unnamed_marker_is_matched_exactly():
    text = ("# BEGIN qborg laptop\nL1\n# END qborg laptop\n"
            "# BEGIN qborg \nX\n# END qborg \n"
            "# BEGIN qborgx\nY\n# END qborgx\n")
    assert repos.split_managed_block(text) == (text, [], "")
    new = repos.render_authorized_keys(text, ["U"])
    assert new == text + "# BEGIN qborg\nU\n# END qborg\n"
    assert repos.split_managed_block(new, "laptop")[1] == ["L1"]


def test_another_installations_block_is_never_inside_ours():
    # a hand-edited file: the laptop's block sits inside the unnamed one
    text = "# BEGIN qborg\nU1\n# BEGIN qborg laptop\nL1\n# END qborg laptop\nU2\n# END qborg\n"
    assert repos.split_managed_block(text) == (text, [], "")
    new = repos.render_authorized_keys(text, ["U"])
    assert new.startswith(text)  # nothing of it rewritten
    owners = repos.lines_by_block(text)
    assert ("laptop", "L1") in owners and (None, "U1") in owners and (None, "U2") in owners


def test_lines_by_block_names_each_lines_installation():
    text = ("a\n# BEGIN qborg\nu\n# END qborg\n# BEGIN qborg laptop\nl\n# END qborg laptop\n"
            "# BEGIN qborg desk\nunclosed\n")
    assert repos.lines_by_block(text) == [
        (None, "a"), (None, "# BEGIN qborg"), ("", "u"), (None, "# END qborg"),
        (None, "# BEGIN qborg laptop"), ("laptop", "l"), (None, "# END qborg laptop"),
        (None, "# BEGIN qborg desk"), (None, "unclosed")]


@pytest.mark.parametrize("line,paths", [
    ('restrict,command="borg14 serve --append-only --restrict-to-repository qborg/./a/" '
     'ssh-ed25519 AAAA c', ["qborg/a"]),
    ('command="borg serve --restrict-to-path=/home/u/x/../y",restrict ssh-ed25519 AAAA c',
     ["/home/u/y"]),
    ('restrict,command="borg serve --restrict-to-path a --restrict-to-repository a/b" '
     'ssh-ed25519 AAAA', ["a", "a/b"]),
    ('ssh-ed25519 AAAA command="borg serve --restrict-to-repository x"', []),
    ('restrict ssh-ed25519 AAAA', []),
    ('command="echo \\"--restrict-to-repository q r\\"" ssh-ed25519 AAAA', []),
])
def test_restricted_paths_reads_the_forced_command_only(line, paths):
    assert repos.restricted_paths(line) == paths


# ------------------------------------------------------------------ refusal


def test_named_installations_side_by_side_pass(merge):
    desktop, laptop = settings(merge), settings(merge, "laptop")
    dk = {"vm-personal": key(), "vm-work": key()}
    lk = {"vm-personal": key(), "vm-work": key()}
    text = account_file(dk, desktop, laptop, lk)
    repos.check_other_installations(laptop, text, block_lines(laptop, lk))
    repos.check_other_installations(desktop, text, block_lines(desktop, dk))
    other = settings(merge, "office")
    repos.check_other_installations(other, text, block_lines(other, {"vm-personal": key()}))


def test_a_repository_of_another_installation_is_refused_naming_both_and_the_path(merge):
    # the desktop (no name) backs up a qube called "laptop": qborg/laptop is
    # its repository, and the laptop's would lie inside it
    desktop = settings(merge, vms={"laptop": {}, "vm-personal": {}})
    text = account_file({"laptop": key(), "vm-personal": key()}, desktop)
    laptop = settings(merge, "laptop")
    with pytest.raises(base_mod.QborgConfigError) as exc:
        repos.check_other_installations(laptop, text, block_lines(laptop, {"vm-personal": key()}))
    message = str(exc.value)
    assert message.startswith("qborg:installation: vm-personal's repository "
                              "qborg/laptop/vm-personal (of installation laptop) is inside "
                              "qborg/laptop, the repository of the key qborg:laptop of the "
                              "installation without a name (block '# BEGIN qborg')")
    assert "nothing was uploaded" in message and "de1234@de1234.rsync.net:22" in message
    # the other way round: the unnamed one would take in the laptop's
    both = repos.render_authorized_keys(account_file({"vm-personal": key()}, settings(merge)),
                                        block_lines(laptop, {"vm-personal": key()}), "laptop")
    with pytest.raises(base_mod.QborgConfigError, match=(
            r"^qborg:installation: laptop's repository qborg/laptop \(of the installation "
            r"without a name\) contains qborg/laptop/vm-personal, the repository of the key "
            r"qborg:laptop:vm-personal of installation laptop")):
        repos.check_other_installations(desktop, both, block_lines(desktop, {"laptop": key()}))


def test_the_same_repository_through_a_vms_own_setting_names_that_setting(merge):
    desktop = settings(merge, "desk")
    text = account_file({}, settings(merge))
    text = repos.render_authorized_keys(text, block_lines(desktop, {"vm-work": key()}), "desk")
    laptop = settings(merge, "laptop", {"vm-work": {
        "repository": "ssh://de1234@de1234.rsync.net/./qborg/desk/vm-work"}})
    with pytest.raises(base_mod.QborgConfigError, match=(
            r"^qborg:vms:vm-work:repository: vm-work's repository qborg/desk/vm-work \(of "
            r"installation laptop\) is qborg/desk/vm-work, the repository of the key "
            r"qborg:desk:vm-work of installation desk \(block '# BEGIN qborg desk'\)")):
        repos.check_other_installations(laptop, text, block_lines(laptop, {"vm-work": key()}))


def test_our_key_on_another_line_is_refused(merge):
    # a renamed installation: its old (unnamed) block still holds its keys
    old, renamed = settings(merge), settings(merge, "laptop")
    keys = {"vm-personal": key()}
    text = account_file(keys, old)
    with pytest.raises(base_mod.QborgConfigError, match=(
            r"^qborg:installation: the key qborg:laptop:vm-personal of installation laptop is "
            r"already on a line of the installation without a name .*remove its old block")):
        repos.check_other_installations(renamed, text, block_lines(renamed, keys))
    # a key copied by hand outside every block shadows ours as well
    hand = f"{ADMIN_A}\nrestrict {keys['vm-personal']} mine\n"
    with pytest.raises(base_mod.QborgConfigError, match="a line outside every qborg block"):
        repos.check_other_installations(renamed, hand, block_lines(renamed, keys))


def test_two_admin_qubes_with_the_same_name_are_refused(merge, tmp_path):
    # the laptop's admin qube forgot its name: the desktop's unnamed block
    # holds keys it never made, which its upload would drop
    desk, laptop = settings(merge), settings(merge)
    dk = {"vm-personal": key(), "vm-work": key()}
    text = account_file(dk, desk)
    store = keystore_mod.Keystore(str(tmp_path / "ks"))
    for vm in ("vm-personal", "vm-work"):
        store.ensure(vm)
    lk = {vm: store.public_key(vm) for vm in ("vm-personal", "vm-work")}
    known = admin.known_key_blobs(store)
    assert known == {k.split()[1] for k in lk.values()}
    with pytest.raises(base_mod.QborgConfigError, match=(
            r"^qborg:installation: the block '# BEGIN qborg' in de1234@de1234.rsync.net:22's "
            r"authorized_keys holds keys this admin qube never made \(qborg:vm-personal, "
            r"qborg:vm-work\): another admin qube uses the same installation name")):
        repos.check_other_installations(laptop, text, block_lines(laptop, lk), known)
    # the desktop itself: its keys are its own, whether held or uploaded
    repos.check_other_installations(desk, text, block_lines(desk, dk), {k.split()[1] for k in dk.values()})
    admin.record_uploaded(store, block_lines(desk, dk), None)
    assert {k.split()[1] for k in dk.values()} <= admin.known_key_blobs(store)
    # a VM gone from pillar: its line leaves the block, its key is still known
    repos.check_other_installations(desk, text, block_lines(desk, {"vm-work": dk["vm-work"]}),
                                    admin.known_key_blobs(store))


def test_paths_of_lines_outside_every_block_are_left_alone(merge):
    # a key the user restricted by hand before qborg: as it always was
    s = settings(merge)
    text = (f"{ADMIN_A}\nrestrict,command=\"borg serve --restrict-to-path qborg\" "
            f"{key()} users-own\n")
    repos.check_other_installations(s, text, block_lines(s, {"vm-personal": key()}))


def test_a_single_installation_file_renders_as_it_always_did(merge):
    s = settings(merge)
    keys = {"vm-personal": key(), "vm-work": key()}
    text = f"{ADMIN_A} admin\n"
    new = repos.render_authorized_keys(text, block_lines(s, keys))
    assert new == (text + "# BEGIN qborg\n" + "".join(
        f'restrict,command="borg14 serve --append-only --restrict-to-repository qborg/{vm}" '
        f"{keys[vm]} qborg:{vm}\n" for vm in sorted(keys)) + "# END qborg\n")
    repos.check_other_installations(s, new, block_lines(s, keys))


# ------------------------------------------------ export, import and status


def test_an_export_is_imported_only_into_its_own_installation(merge, tmp_path):
    laptop = settings(merge, "laptop")
    server_entry = {"title": "server", "password": "",
                    "properties": {"known_hosts": "", "installation": "laptop"}}
    export_mod.plan_import(laptop, str(tmp_path), [server_entry])
    for other in (settings(merge), settings(merge, "desk")):
        with pytest.raises(base_mod.QborgError, match=(
                r"^the export is of installation laptop, this admin qube's settings are for "
                r"(the installation without a name|installation desk) .*nothing was written")):
            export_mod.plan_import(other, str(tmp_path), [server_entry])
    unnamed = {"title": "server", "password": "", "properties": {"known_hosts": ""}}
    export_mod.plan_import(settings(merge), str(tmp_path), [unnamed])
    with pytest.raises(base_mod.QborgError, match="the export is of the installation without"):
        export_mod.plan_import(laptop, str(tmp_path), [unnamed])


def test_status_names_a_named_installation_only():
    data = {"vms": [], "last_maintenance_run": None, "installation": None}
    assert "installation" not in maint_mod.status_table(data)
    assert maint_mod.status_table(dict(data, installation="laptop")).endswith(
        "\ninstallation: laptop")
