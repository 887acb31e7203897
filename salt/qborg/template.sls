{#- template part: the packages qborg's qubes run. Every template gets borg,
    borgmatic, the ssh client and cron; the admin qube's template also the
    Python libraries the admin qube's programs import (paramiko, passlib,
    cryptography, pykeepass). qborg:admin_template names that template;
    unset, every template gets them. #}
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
{%- if grains["id"] == "dom0" or family not in packages %}

qborg-template-unsupported:
  test.fail_without_changes:
    - name: >-
        qborg's template part installs packages in Debian and Fedora
        templates only, not in {{ grains["id"] }} ({{ family }})
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
