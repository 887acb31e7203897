{#- template part: the packages qborg's qubes run. Every template gets borg,
    borgmatic, the ssh client and cron; the admin qube's template also the
    Python libraries the admin qube's programs import (paramiko, passlib,
    cryptography, pykeepass). qborg:admin_template names that template;
    unset, every template gets them.
    The names are those of Debian 12 and 13 and Fedora 41 and 42 (checked
    against each release's package index; tests/functional/test_template.py). #}
{%- from "qborg/map.jinja" import qborg with context %}
{%- set packages = {
      "Debian": {
        "base": ["borgbackup", "borgmatic", "openssh-client", "cron"],
        "admin": ["python3-paramiko", "python3-passlib", "python3-cryptography",
                  "python3-pykeepass"],
      },
      "RedHat": {
        "base": ["borgbackup", "borgmatic", "openssh-clients", "cronie"],
        "admin": ["python3-paramiko", "python3-passlib", "python3-cryptography",
                  "python3-pykeepass"],
      },
    } %}
{%- set family = grains["os_family"] %}
{%- set admin_template = qborg.get("admin_template") %}
{%- set for_admin = not admin_template or admin_template == grains["id"] %}
{#- Fedora 41 and later install with dnf5, which salt before 3006.10 drives
    with dnf4's arguments: pkg.installed fails there (saltstack/salt#67057).
    Salt runs in the template as the management disposable's salt: Qubes'
    Fedora 40 one has 3006.8; Fedora 41's 3007.1 and 42's 3007.5 drive dnf5
    (since 3007.0). #}
{%- set dnf5 = grains.get("os") == "Fedora" and (grains.get("osmajorrelease") or 0) | int >= 41 %}
{%- set salt_version = (grains.get("saltversioninfo") or [])[:2] %}
{%- set salt_lacks_dnf5 = dnf5 and salt_version and salt_version < [3006, 10] %}
{%- if grains["id"] == "dom0" or family not in packages %}

qborg-template-unsupported:
  test.fail_without_changes:
    - name: >-
        qborg's template part installs packages in Debian and Fedora
        templates only, not in {{ grains["id"] }} ({{ family }})
{%- elif salt_lacks_dnf5 %}
{%- set names = packages[family].base + (packages[family].admin if for_admin else []) %}

{%- set workaround -%}
salt {{ grains["saltversion"] }} cannot install packages in {{ grains["id"] }}:
Fedora {{ grains["osmajorrelease"] }} installs with dnf5, which salt drives only
from 3006.10 on (saltstack/salt#67057). Install them in the template by hand,
then apply again: sudo dnf install -y {{ names | join(" ") }}; or apply with a
management disposable that runs salt 3006.10 or newer (one based on a Fedora
41 or 42 template runs 3007): qvm-prefs {{ grains["id"] }} management_dispvm
THAT-DISPVM
{%- endset %}

{#- passes once the packages are there (installed by hand) #}
qborg-template-salt-without-dnf5:
  test.fail_without_changes:
    - name: {{ ("salt %s cannot install packages in %s (dnf5, saltstack/salt#67057)"
               % (grains["saltversion"], grains["id"])) | json }}
    - comment: {{ workaround.split() | join(" ") | json }}
    - unless: rpm -q {{ names | join(" ") }}
{%- else %}

qborg-template-packages:
  pkg.installed:
    - pkgs: {{ packages[family].base | json }}
{%- if for_admin %}

qborg-template-admin-packages:
  pkg.installed:
    - pkgs: {{ packages[family].admin | json }}
{%- endif %}
{%- endif %}
