"""The package names per os_family: qborg:packages and qborg:admin_packages
in defaults.yaml, picked by map.jinja from grains os_family, replaced per
family by pillar, and checked (a bad override fails the render naming its
pillar field, in every part that imports map.jinja)."""

import pathlib

import pytest
import yaml

from .test_template import ADMIN_LIBS, DEBIAN_BASE, FEDORA_BASE, TEMPLATE_PILLAR, packages

DEFAULTS = pathlib.Path(__file__).resolve().parents[2] / "salt" / "qborg" / "defaults.yaml"
DEBIAN = {"os_family": "Debian", "os": "Debian", "osmajorrelease": 12}
FEDORA = {"os_family": "RedHat", "os": "Fedora", "osmajorrelease": 42}


def test_defaults_hold_the_names_of_each_family():
    qborg = yaml.safe_load(DEFAULTS.read_text())["qborg"]
    assert qborg["packages"] == {"Debian": DEBIAN_BASE, "RedHat": FEDORA_BASE}
    assert qborg["admin_packages"] == {"Debian": ADMIN_LIBS, "RedHat": ADMIN_LIBS}


@pytest.mark.parametrize("grains,base", [(DEBIAN, DEBIAN_BASE), (FEDORA, FEDORA_BASE)],
                         ids=["Debian", "RedHat"])
def test_the_template_gets_its_familys_names(loaders_for, grains, base):
    loaders = loaders_for("pkg-" + grains["os_family"].lower(), grains)
    assert packages(loaders, TEMPLATE_PILLAR) == {
        "qborg-template-packages": base, "qborg-template-admin-packages": ADMIN_LIBS}


def test_pillar_replaces_one_familys_list_and_leaves_the_other(loaders_for):
    pillar = {**TEMPLATE_PILLAR, "qborg": {"packages": {"Debian": ["borgbackup", "borgmatic"]},
                                           "admin_packages": {"Debian": []}}}
    debian = packages(loaders_for("pkg-debian", DEBIAN), pillar)
    assert debian == {"qborg-template-packages": ["borgbackup", "borgmatic"]}
    fedora = packages(loaders_for("pkg-redhat", FEDORA), pillar)
    assert fedora == {"qborg-template-packages": FEDORA_BASE,
                      "qborg-template-admin-packages": ADMIN_LIBS}


def test_another_family_given_in_pillar_is_installed(loaders_for):
    loaders = loaders_for("arch-tpl", {"os_family": "Arch", "os": "Arch"})
    pillar = {**TEMPLATE_PILLAR, "qborg": {"packages": {"Arch": ["borg", "borgmatic"]},
                                           "admin_packages": {"Arch": ["python-paramiko"]}}}
    assert packages(loaders, pillar) == {"qborg-template-packages": ["borg", "borgmatic"],
                                         "qborg-template-admin-packages": ["python-paramiko"]}


def test_empty_lists_install_nothing(loaders_for):
    pillar = {**TEMPLATE_PILLAR, "qborg": {"packages": {"Debian": []},
                                           "admin_packages": {"Debian": []}}}
    high = loaders_for("pkg-debian", DEBIAN).modules.state.show_sls("qborg", pillar=pillar)
    assert list(high) == ["qborg-template-nothing-to-install"]


def render_error(loaders, sls, pillar):
    high = loaders.modules.state.show_sls(sls, pillar=pillar)
    assert isinstance(high, list), high  # a list: the render errors
    return " ".join(high)


@pytest.mark.parametrize("override,field,says", [
    ({"packages": {"Debian": "borgbackup"}}, "qborg:packages:Debian", "must be a list"),
    ({"packages": {"RedHat": None}}, "qborg:packages:RedHat", "must be a list"),
    ({"packages": ["borgbackup"]}, "qborg:packages", "must be a mapping of os_family"),
    ({"admin_packages": {"Debian": [3]}}, "qborg:admin_packages:Debian[0]", "not a package name"),
    ({"packages": {"Debian": ["borgbackup", "cron; reboot"]}}, "qborg:packages:Debian[1]",
     "not a package name"),
    ({"packages": {"Debian": ["borgbackup\n"]}}, "qborg:packages:Debian[0]", "not a package name"),
    ({"packages": {"Debian": ["-o"]}}, "qborg:packages:Debian[0]", "not a package name"),
    ({"packages": {"Arch": ["borg"]}}, "qborg:admin_packages:Arch", "missing"),
], ids=["string", "null", "list-of-families", "number", "shell", "newline", "option", "no-admin"])
def test_a_bad_override_fails_naming_the_field(loaders_for, override, field, says):
    grains = {"os_family": "Arch", "os": "Arch"} if "Arch" in str(override) else DEBIAN
    loaders = loaders_for("pkg-" + grains["os_family"].lower(), grains)
    message = render_error(loaders, "qborg", {**TEMPLATE_PILLAR, "qborg": override})
    assert field + ":" in message and says in message


def test_a_bad_override_fails_every_part_not_only_the_templates(loaders_for):
    """Like every other pillar error: the client part fails too (on Fedora's
    list, while rendered for a Debian-family qube)."""
    loaders = loaders_for("vm-personal")
    message = render_error(loaders, "qborg", {"qborg": {"packages": {"RedHat": "cronie"}}})
    assert "qborg:packages:RedHat: must be a list" in message
