{#- relay part (qborg:relay_vm, a qube with network): the qrexec service
    qborg.SshRelay that carries the ssh connection of each VM with
    `via: relay` to its server, and the configuration that names, per
    relayed VM, the one server it may reach. No key and no passphrase ever
    come here: the relay sees ssh's ciphertext only. #}
{%- from "qborg/map.jinja" import qborg with context %}
{%- set prefix = qborg.paths.prefix %}
{%- set lib_dir = prefix ~ "/lib/qborg" %}
{%- set relay_config = prefix ~ "/etc/qborg/relay.json" %}

qborg-relay-pillar-valid:
  qborg.settings_valid:
    - config: {{ qborg | json }}
    - order: 1
    - failhard: True

qborg-relay-core:
  qborg.core_installed:
    - name: {{ lib_dir | json }}
    - require:
      - qborg: qborg-relay-pillar-valid

{#- root's, readable by the service (which runs as the qube's user): the
    caller cannot change where its bytes go #}
qborg-relay-config:
  file.managed:
    - name: {{ relay_config }}
    - contents: {{ salt["qborg.relay_config_text"](qborg) | json }}
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - require:
      - qborg: qborg-relay-pillar-valid

qborg-relay-service:
  file.managed:
    - name: {{ prefix }}/etc/qubes-rpc/qborg.SshRelay
    - source: salt://qborg/files/common/qborg-entry
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - qborg: qborg-relay-core
      - file: qborg-relay-config
