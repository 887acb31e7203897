{#- template part: the packages qborg's qubes run. Every template gets borg,
    borgmatic, the ssh client and cron; the admin qube's template also the
    Python libraries the admin qube's programs import (paramiko, passlib,
    cryptography, pykeepass). qborg:admin_template names that template;
    unset, every template gets them.
    The names, per os_family, are qborg:packages and qborg:admin_packages
    (defaults.yaml, those of Debian 12 and 13 and Fedora 41 and 42, checked
    against each release's package index; tests/functional/test_template.py);
    map.jinja picks this template's family and checks a pillar override. #}
{%- from "qborg/map.jinja" import qborg, packages with context %}
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
{%- set names = (packages.base + (packages.admin if for_admin else [])) if packages else [] %}
{%- if grains["id"] == "dom0" or packages is none %}

qborg-template-unsupported:
  test.fail_without_changes:
    - name: >-
        qborg's template part installs packages in Debian and Fedora
        templates only, not in {{ grains["id"] }} ({{ family }}); for
        another family, list its names under qborg:packages:{{ family }}
        and qborg:admin_packages:{{ family }}
{%- elif not names %}

qborg-template-nothing-to-install:
  test.nop:
    - name: {{ ("qborg:packages:%s and qborg:admin_packages:%s name nothing for %s"
               % (family, family, grains["id"])) | json }}
{%- elif salt_lacks_dnf5 %}

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
{#- one of the two may be empty (pillar []) #}
{%- if packages.base %}

qborg-template-packages:
  pkg.installed:
    - pkgs: {{ packages.base | json }}
{%- endif %}
{%- if for_admin and packages.admin %}

qborg-template-admin-packages:
  pkg.installed:
    - pkgs: {{ packages.admin | json }}
{%- endif %}
{%- endif %}
