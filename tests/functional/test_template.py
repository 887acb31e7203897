"""The template part rendered by Salt for Debian 12 and 13 and Fedora 41
and 42 templates (grains os_family, os, osmajorrelease): package names per
release, and the admin qube's Python libraries only in qborg:admin_template
(or, unset, in every template). Salt before 3006.10 cannot install with
Fedora 41's dnf5 (saltstack/salt#67057): there the part refuses, naming the
workaround, and installs nothing."""

import pytest

# Each name checked against the release's package index (Debian: bookworm,
# trixie; Fedora: 41, 42): cron is Fedora's cronie, openssh-client its
# openssh-clients.
DEBIAN_BASE = ["borgbackup", "borgmatic", "openssh-client", "cron"]
FEDORA_BASE = ["borgbackup", "borgmatic", "openssh-clients", "cronie"]
ADMIN_LIBS = ["python3-paramiko", "python3-passlib", "python3-cryptography", "python3-pykeepass"]
RELEASES = {
    "debian-12": ({"os_family": "Debian", "os": "Debian", "osmajorrelease": 12}, DEBIAN_BASE),
    "debian-13": ({"os_family": "Debian", "os": "Debian", "osmajorrelease": 13}, DEBIAN_BASE),
    "fedora-41": ({"os_family": "RedHat", "os": "Fedora", "osmajorrelease": 41}, FEDORA_BASE),
    "fedora-42": ({"os_family": "RedHat", "os": "Fedora", "osmajorrelease": 42}, FEDORA_BASE),
}
TEMPLATE_PILLAR = {"qubes": {"type": "template"}}


def sls_ids(high):
    assert isinstance(high, dict), high
    assert {body["__sls__"] for body in high.values()} == {"qborg.template"}
    return set(high)


def packages(loaders, pillar):
    high = loaders.modules.state.show_sls("qborg", pillar=pillar)
    sls_ids(high)
    found = {}
    for sid, body in high.items():
        assert "installed" in body["pkg"]
        found[sid] = next(i["pkgs"] for i in body["pkg"] if isinstance(i, dict) and "pkgs" in i)
    return found


def salt_grains(version):
    """The version grains of a salt VERSION such as "3006.8"."""
    major, minor = (int(part) for part in version.split("."))
    return {"saltversion": version, "saltversioninfo": [major, minor, None, 0]}


@pytest.fixture(params=sorted(RELEASES))
def template(request, loaders_for):
    """A template of each release, with the salt that runs these tests."""
    grains, base = RELEASES[request.param]
    return request.param, base, loaders_for(request.param, grains)


def test_admin_template_gets_the_base_packages_and_the_admin_libraries(template):
    name, base, loaders = template
    found = packages(loaders, {"qborg": {"templates": [name], "admin_template": name}})
    assert found == {"qborg-template-packages": base,
                     "qborg-template-admin-packages": ADMIN_LIBS}


def test_another_template_gets_only_the_base_packages(template):
    name, base, loaders = template
    found = packages(loaders, {"qborg": {"templates": [name], "admin_template": "other-tpl"}})
    assert found == {"qborg-template-packages": base}


def test_without_admin_template_every_template_gets_the_libraries(template):
    name, base, loaders = template
    found = packages(loaders, TEMPLATE_PILLAR)
    assert found == {"qborg-template-packages": base,
                     "qborg-template-admin-packages": ADMIN_LIBS}


def test_fedora_and_debian_names_differ_where_the_distributions_do():
    assert set(DEBIAN_BASE) ^ set(FEDORA_BASE) == {
        "openssh-client", "openssh-clients", "cron", "cronie"}


def test_an_unsupported_family_fails_clearly_and_installs_nothing(loaders_for):
    loaders = loaders_for("arch-tpl", {"os_family": "Arch", "os": "Arch"})
    high = loaders.modules.state.show_sls("qborg", pillar=TEMPLATE_PILLAR)
    assert list(high) == ["qborg-template-unsupported"]
    state = high["qborg-template-unsupported"]["test"]
    assert "fail_without_changes" in state
    assert "Debian and Fedora templates only, not in arch-tpl (Arch)" in state[0]["name"]


# --- the salt of the management disposable against Fedora's dnf5 -------------
# Qubes' management disposables: Fedora 40 runs salt 3006.8, 41 3007.1, 42 3007.5.

@pytest.mark.parametrize("release,salt", [
    ("fedora-40", "3006.8"),   # dnf4: any salt
    ("fedora-41", "3006.10"),  # the first 3006 with dnf5 support
    ("fedora-41", "3007.1"),   # Qubes' Fedora 41 management disposable
    ("fedora-42", "3007.5"),   # Qubes' Fedora 42 management disposable
])
def test_a_salt_that_knows_dnf5_installs_the_packages(loaders_for, release, salt):
    major = int(release.split("-")[1])
    grains = {"os_family": "RedHat", "os": "Fedora", "osmajorrelease": major, **salt_grains(salt)}
    loaders = loaders_for(release, grains)
    assert packages(loaders, TEMPLATE_PILLAR) == {
        "qborg-template-packages": FEDORA_BASE, "qborg-template-admin-packages": ADMIN_LIBS}


@pytest.mark.parametrize("release,salt", [("fedora-41", "3006.8"), ("fedora-42", "3006.9")])
def test_salt_3006_before_3006_10_refuses_a_dnf5_template_naming_the_workaround(
        loaders_for, release, salt):
    major = int(release.split("-")[1])
    grains = {"os_family": "RedHat", "os": "Fedora", "osmajorrelease": major, **salt_grains(salt)}
    loaders = loaders_for(release, grains)
    pillar = {"qborg": {"templates": [release], "admin_template": "other-tpl"}}

    high = loaders.modules.state.show_sls("qborg", pillar=pillar)
    assert sls_ids(high) == {"qborg-template-salt-without-dnf5"}   # no pkg state at all
    body = high["qborg-template-salt-without-dnf5"]["test"]
    args = {key: value for item in body if isinstance(item, dict) for key, value in item.items()}
    # once the packages are there (installed by hand), the state passes
    assert args["unless"] == "rpm -q " + " ".join(FEDORA_BASE)

    # applied: it fails, and says why and what to do
    result = loaders.modules.state.sls("qborg", pillar=pillar).raw
    (state,) = result.values()
    assert state["result"] is False and not state["changes"]
    assert state["name"] == ("salt %s cannot install packages in %s (dnf5, saltstack/salt#67057)"
                             % (salt, release))
    message = state["comment"]
    assert "salt %s cannot install packages in %s" % (salt, release) in message
    assert "dnf5" in message and "saltstack/salt#67057" in message
    assert "sudo dnf install -y " + " ".join(FEDORA_BASE) + ";" in message
    assert "salt 3006.10 or newer" in message
    assert "qvm-prefs %s management_dispvm" % release in message


def test_the_refusal_names_the_admin_libraries_in_the_admin_template(loaders_for):
    grains = {"os_family": "RedHat", "os": "Fedora", "osmajorrelease": 41, **salt_grains("3006.8")}
    loaders = loaders_for("fedora-41", grains)
    high = loaders.modules.state.show_sls("qborg", pillar=TEMPLATE_PILLAR)
    body = high["qborg-template-salt-without-dnf5"]["test"]
    comment = next(item["comment"] for item in body if isinstance(item, dict) and "comment" in item)
    assert "sudo dnf install -y " + " ".join(FEDORA_BASE + ADMIN_LIBS) + ";" in comment
