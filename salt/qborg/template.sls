{#- template part: the packages the admin qube and AppVMs need. #}
{%- from "qborg/map.jinja" import qborg with context %}
{%- if grains["os_family"] == "RedHat" %}
{%- set pkgs = ["borgbackup", "borgmatic", "openssh-clients", "cronie",
                "python3-paramiko", "python3-passlib", "python3-cryptography",
                "python3-pykeepass", "keepassxc"] %}
{%- else %}
{%- set pkgs = ["borgbackup", "borgmatic", "openssh-client", "cron",
                "python3-paramiko", "python3-passlib", "python3-cryptography", "python3-yaml",
                "python3-pykeepass", "keepassxc"] %}
{%- endif %}

qborg-template-packages:
  pkg.installed:
    - pkgs: {{ pkgs | json }}
