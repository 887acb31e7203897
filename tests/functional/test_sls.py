"""Rendering the formula's sls files for this minion (id vm-personal)."""

import yaml


def test_qborg_renders_the_client_part_for_a_configured_vm(modules):
    high = modules.state.show_sls("qborg")
    assert isinstance(high, dict), high  # a list means render errors
    ids = set(high)
    assert {"qborg-client-pillar-valid", "qborg-client-bundle", "qborg-client-ssh-config",
            "qborg-client-borgmatic", "qborg-client-borgbak", "qborg-client-backup-program",
            "qborg-client-schedule", "qborg-client-schedule-boot"} <= ids
    assert not any(i.startswith(("qborg-dom0-", "qborg-admin-", "qborg-template-")) for i in ids)
    assert all(i.startswith("qborg-client-") for i in ids)


def _arg(state, fun, key):
    for item in state[fun]:
        if isinstance(item, dict) and key in item:
            return item[key]
    raise KeyError(key)


def test_client_states_carry_the_rendered_values(modules):
    high = modules.state.show_sls("qborg")
    borgmatic = high["qborg-client-borgmatic"]
    assert "borgmatic_config_managed" in borgmatic["qborg"]
    assert _arg(borgmatic, "qborg", "name") == "/root/.config/borgmatic.d/qborg.yaml"
    assert _arg(borgmatic, "qborg", "config")["vms"]["vm-personal"] == {"interval": "30m"}
    schedule = high["qborg-client-schedule"]
    assert _arg(schedule, "cron", "name") == \
        "/usr/local/bin/qborg-backup --scheduled --interval 30m --notify all --stale-after 2 " \
        "--jitter 120"
    assert _arg(schedule, "cron", "minute") == "*/5"
    boot = high["qborg-client-schedule-boot"]
    assert _arg(boot, "cron", "special") == "@reboot"
    assert _arg(boot, "cron", "name") == \
        "/usr/local/bin/qborg-backup --scheduled --interval 30m --notify all --stale-after 2 " \
        "--delay 60 --jitter 60"
    assert _arg(boot, "cron", "identifier") != _arg(schedule, "cron", "identifier")
    ssh = high["qborg-client-ssh-config"]
    assert "ssh_config_managed" in ssh["qborg"]
    assert _arg(ssh, "qborg", "name") == "/root/.ssh/config"


def test_no_secret_in_the_rendered_states(modules):
    text = str(modules.state.show_sls("qborg"))
    assert "PRIVATE KEY" not in text
    assert "encryption_passphrase" not in text


def test_dom0_gets_only_the_policy(loaders_for):
    high = loaders_for("dom0").modules.state.show_sls("qborg")
    assert isinstance(high, dict), high
    assert {"qborg-dom0-pillar-valid", "qborg-dom0-policy", "qborg-dom0-admin-settings"} <= set(high)
    assert all(i.startswith("qborg-dom0-") for i in high)
    policy = high["qborg-dom0-policy"]["file"]
    context = next(i["context"] for i in policy if isinstance(i, dict) and "context" in i)
    assert context == {"admin_vm": "backup-admin", "vms": ["vm-personal", "vm-work"],
                       "relay_vm": None, "relayed_vms": []}


def test_admin_qube_gets_the_admin_part(loaders_for):
    high = loaders_for("backup-admin").modules.state.show_sls("qborg")
    assert isinstance(high, dict), high
    assert {"qborg-admin-pillar-valid", "qborg-admin-getbundle-service",
            "qborg-admin-provisioned"} <= set(high)
    assert all(i.startswith("qborg-admin-") for i in high)


def test_unrelated_qube_gets_nothing(loaders_for):
    high = loaders_for("sys-net").modules.state.show_sls("qborg")
    assert isinstance(high, dict), high
    assert list(high) == ["qborg-nothing-to-do"]
    assert "test" in high["qborg-nothing-to-do"]
