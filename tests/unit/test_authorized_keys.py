"""The server side: forced commands, repository URLs and the managed block
of authorized_keys, which must leave every other line alone."""

import pytest

import _qborg_base as base_mod
import _qborg_servers as servers_mod
import _qborg_settings as settings
import _qborg_repos as repos

VM_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIFakeVmKeyForTestsOnly0000000000000000000"
ADMIN_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIAdminKeyForTestsOnly000000000000000000"
OTHER_KEY = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQOtherUsersKey"


def server(merge, **srv):
    base = {"host": "de1234.rsync.net", "user": "de1234"}
    base.update(srv)
    return settings.validate_settings(merge({"server": base, "vms": {"vm-personal": {}}}))["server"]


def test_authorized_keys_line_exact_format(merge):
    line = repos.authorized_keys_line("vm-personal", VM_KEY, server(merge))
    assert line == ('restrict,command="borg serve --append-only --restrict-to-repository '
                    f'qborg/vm-personal" {VM_KEY} qborg:vm-personal')
    assert "cd " not in line
    assert "\n" not in line


def test_forced_command_uses_the_provider_borg(merge):
    line = repos.authorized_keys_line("vm-personal", VM_KEY, server(merge, provider="rsync.net"))
    assert line.startswith('restrict,command="borg14 serve --append-only '
                           '--restrict-to-repository qborg/vm-personal"')


def test_storage_quota_in_forced_command(merge):
    line = repos.authorized_keys_line("vm-personal", VM_KEY, server(merge), "200G")
    command = line.split('"')[1]
    assert command == ("borg serve --append-only --restrict-to-repository qborg/vm-personal "
                       "--storage-quota 200G")


def test_key_comment_is_replaced_by_the_vm_marker(merge):
    line = repos.authorized_keys_line("vm-personal", VM_KEY + " user@laptop", server(merge))
    assert line.endswith(f"{VM_KEY} qborg:vm-personal")
    assert "laptop" not in line


@pytest.mark.parametrize("pubkey", [
    OTHER_KEY, "ssh-ed25519", "ssh-ed25519 AAAA\" command=\"sh", "",
])
def test_non_ed25519_or_malformed_key_refused(merge, pubkey):
    with pytest.raises(base_mod.QborgConfigError):
        repos.authorized_keys_line("vm-personal", pubkey, server(merge))


def test_bad_vm_name_refused_in_forced_command(merge):
    with pytest.raises(base_mod.QborgConfigError):
        repos.authorized_keys_line('vm" ssh-ed25519', VM_KEY, server(merge))


def test_repository_urls(merge):
    assert servers_mod.repository_url(server(merge, provider="rsync.net"), "vm-personal") == \
        "ssh://de1234@de1234.rsync.net:22/./qborg/vm-personal"
    hetzner = server(merge, provider="hetzner", host="u1.your-storagebox.de", user="u1")
    assert servers_mod.repository_url(hetzner, "vm") == "ssh://u1@u1.your-storagebox.de:23/./qborg/vm"
    assert repos.alias_repository_url(hetzner, "vm") == "ssh://qborg/./qborg/vm"


def test_known_hosts_host_brackets_non_default_ports(merge):
    assert repos.known_hosts_host(server(merge)) == "de1234.rsync.net"
    assert repos.known_hosts_host(server(merge, provider="hetzner")) == "[de1234.rsync.net]:23"


# ---------------------------------------------------------------- the block

MANAGED = [f'restrict,command="borg serve" {VM_KEY} qborg:vm-personal']


def outside_lines(text):
    """The lines outside the managed block, each with its line ending."""
    before, _managed, after = repos.split_managed_block(text)
    return before + after


def test_block_appended_when_absent_and_other_lines_kept():
    existing = f"# my keys\n{ADMIN_KEY} admin@laptop\n{OTHER_KEY} other\n"
    new = repos.render_authorized_keys(existing, MANAGED)
    assert new == existing + "# BEGIN qborg\n" + MANAGED[0] + "\n# END qborg\n"


def test_empty_and_missing_file_get_only_the_block():
    expected = "# BEGIN qborg\n" + MANAGED[0] + "\n# END qborg\n"
    assert repos.render_authorized_keys("", MANAGED) == expected
    assert repos.render_authorized_keys(None, MANAGED) == expected


def test_block_replaced_and_surroundings_kept_byte_for_byte():
    before = (f"{ADMIN_KEY} admin\r\n"                                   # CRLF line
              "# a comment with \"quotes\"\n"
              f'from="10.0.0.1",command="/usr/bin/rrsync -ro /srv" {OTHER_KEY} backup\n'
              "\n")
    after = f"   # indented comment\n{OTHER_KEY} no-trailing-newline"
    old_block = "# BEGIN qborg\nrestrict,command=\"old\" ssh-ed25519 AAAAold qborg:gone\n# END qborg\n"
    new = repos.render_authorized_keys(before + old_block + after, MANAGED)
    assert new == before + "# BEGIN qborg\n" + MANAGED[0] + "\n# END qborg\n" + after
    assert "qborg:gone" not in new


def test_crlf_markers_are_recognised():
    text = f"{ADMIN_KEY} admin\r\n# BEGIN qborg\r\nold line\r\n# END qborg\r\ntail\r\n"
    before, managed, after = repos.split_managed_block(text)
    assert (before, managed, after) == (f"{ADMIN_KEY} admin\r\n", ["old line"], "tail\r\n")
    new = repos.render_authorized_keys(text, MANAGED)
    assert "old line" not in new
    assert new.count("# BEGIN qborg") == 1


def test_file_without_trailing_newline_gets_one_before_the_block():
    existing = f"{ADMIN_KEY} admin"
    new = repos.render_authorized_keys(existing, MANAGED)
    assert new.startswith(existing + "\n# BEGIN qborg\n")
    assert repos.contains_key(new, ADMIN_KEY)


@pytest.mark.parametrize("existing", [
    "",
    f"{ADMIN_KEY} admin\n",
    f"{ADMIN_KEY} admin",
    f"{ADMIN_KEY} admin\r\n# BEGIN qborg\nx\n# END qborg\n{OTHER_KEY} o",
    # a hand-edited file with an unmatched BEGIN above the real block
    f"{ADMIN_KEY} admin\n# BEGIN qborg\n{OTHER_KEY} user-line\n",
])
def test_render_is_idempotent(existing):
    once = repos.render_authorized_keys(existing, MANAGED)
    twice = repos.render_authorized_keys(once, MANAGED)
    assert twice == once
    # what was outside the block before is still outside it, line for line
    for line in outside_lines(existing).splitlines():
        assert line in outside_lines(once).splitlines()


def test_unmatched_begin_never_swallows_user_lines():
    existing = f"{ADMIN_KEY} admin\n# BEGIN qborg\n{OTHER_KEY} user-line\n"
    once = repos.render_authorized_keys(existing, MANAGED)
    again = repos.render_authorized_keys(once, ["restrict ssh-ed25519 AAAAnew qborg:vm-x"])
    assert f"{OTHER_KEY} user-line" in again
    assert repos.contains_key(again, ADMIN_KEY)


def test_changing_managed_lines_only_touches_the_block():
    existing = repos.render_authorized_keys(f"{ADMIN_KEY} admin\n", MANAGED)
    new = repos.render_authorized_keys(existing, [])
    assert new == f"{ADMIN_KEY} admin\n# BEGIN qborg\n# END qborg\n"
    assert repos.split_managed_block(new)[1] == []


def test_contains_key_only_in_active_lines():
    blob = ADMIN_KEY.split()[1]
    assert repos.contains_key(f"{ADMIN_KEY} admin\n", ADMIN_KEY)
    assert repos.contains_key(f"  {ADMIN_KEY}\r\n", ADMIN_KEY + " some-comment")
    assert repos.contains_key(f'restrict,command="echo hi there" {ADMIN_KEY} admin\n', ADMIN_KEY)
    assert not repos.contains_key(f"# {ADMIN_KEY} admin (disabled)\n", ADMIN_KEY)
    assert not repos.contains_key(f"#{ADMIN_KEY}\n", ADMIN_KEY)
    assert not repos.contains_key(f"{VM_KEY} vm\n", ADMIN_KEY)
    assert not repos.contains_key("", ADMIN_KEY)
    # the blob only inside an option string is not a key of that line
    assert not repos.contains_key(f'command="echo {ADMIN_KEY}" {VM_KEY} x\n', ADMIN_KEY)
    assert not repos.contains_key(f"ssh-ed25519 {blob}XYZ admin\n", ADMIN_KEY)
