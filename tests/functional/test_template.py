"""The template part rendered by Salt for a Debian and a Fedora template
(grains os_family Debian / RedHat): package names per family, and the
admin qube's Python libraries only in qborg:admin_template (or, unset, in
every template)."""

import pytest

DEBIAN = {"os_family": "Debian", "os": "Debian"}
FEDORA = {"os_family": "RedHat", "os": "Fedora"}
BASE = {
    "Debian": ["borgbackup", "borgmatic", "openssh-client", "cron"],
    "RedHat": ["borgbackup", "borgmatic", "openssh-clients", "cronie"],
}
ADMIN_LIBS = ["python3-paramiko", "python3-passlib", "python3-cryptography", "python3-pykeepass"]


def packages(loaders, pillar):
    high = loaders.modules.state.show_sls("qborg", pillar=pillar)
    assert isinstance(high, dict), high
    assert {body["__sls__"] for body in high.values()} == {"qborg.template"}
    found = {}
    for sid, body in high.items():
        assert "installed" in body["pkg"]
        found[sid] = next(i["pkgs"] for i in body["pkg"] if isinstance(i, dict) and "pkgs" in i)
    return found


@pytest.fixture(params=[("debian-12-xfce", DEBIAN), ("fedora-41", FEDORA)],
                ids=["debian", "fedora"])
def template(request, loaders_for):
    name, grains = request.param
    return name, grains["os_family"], loaders_for(name, grains)


def test_admin_template_gets_the_base_packages_and_the_admin_libraries(template):
    name, family, loaders = template
    found = packages(loaders, {"qborg": {"templates": [name], "admin_template": name}})
    assert found == {"qborg-template-packages": BASE[family],
                     "qborg-template-admin-packages": ADMIN_LIBS}


def test_another_template_gets_only_the_base_packages(template):
    name, family, loaders = template
    found = packages(loaders, {"qborg": {"templates": [name], "admin_template": "other-tpl"}})
    assert found == {"qborg-template-packages": BASE[family]}


def test_without_admin_template_every_template_gets_the_libraries(template):
    name, family, loaders = template
    found = packages(loaders, {"qubes": {"type": "template"}})
    assert found == {"qborg-template-packages": BASE[family],
                     "qborg-template-admin-packages": ADMIN_LIBS}


def test_fedora_and_debian_names_differ_where_the_distributions_do():
    assert set(BASE["Debian"]) ^ set(BASE["RedHat"]) == {
        "openssh-client", "openssh-clients", "cron", "cronie"}


def test_an_unsupported_family_fails_clearly_and_installs_nothing(loaders_for):
    loaders = loaders_for("arch-tpl", {"os_family": "Arch", "os": "Arch"})
    high = loaders.modules.state.show_sls("qborg", pillar={"qubes": {"type": "template"}})
    assert list(high) == ["qborg-template-unsupported"]
    state = high["qborg-template-unsupported"]["test"]
    assert "fail_without_changes" in state
    assert "Debian and Fedora templates only, not in arch-tpl (Arch)" in state[0]["name"]
