"""The admin's provisioning for a provider whose keys are added in its own
interface (BorgBase): real borg and ssh against a closed port (the rest:
tests/unit/test_admin.py)."""

import pytest

import _qborg_base as base_mod
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod
import _qborg_keystore as keystore_mod
import _qborg_admin as admin
import unit.test_admin
from unit.test_admin import HOST_KEY

settings = unit.test_admin.settings  # the fixture


def test_provision_for_borgbase_uploads_nothing_and_names_each_key_to_add(settings, tmp_path):
    settings["server"].update(provider="borgbase", upload=False, host_key=HOST_KEY)
    with pytest.raises(base_mod.QborgServerError) as exc:
        admin.provision(settings, str(tmp_path), None)
    store = keystore_mod.Keystore(str(tmp_path / ".local" / "share" / "qborg"))
    message = str(exc.value)
    assert "admin key" not in message  # no session with the full-access key
    for vm in ("vm-personal", "vm-work"):
        url = servers_mod.repository_url(settings["server"], vm)
        assert f"add this public key to {url} as an append-only key" in message
        assert store.public_key(vm) in message
        assert store.passphrase(vm) not in message
    keys = {vm: store.public_key(vm) for vm in ("vm-personal", "vm-work")}
    with pytest.raises(base_mod.QborgServerError):
        admin.provision(settings, str(tmp_path), None)
    assert {vm: store.public_key(vm) for vm in keys} == keys
