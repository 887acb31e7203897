{#- dom0 part: the qrexec policy that lets each configured VM ask the admin
    qube for its own bundle, and nothing else. Never writes into a home. #}
{%- from "qborg/map.jinja" import qborg with context %}

qborg-dom0-pillar-valid:
  qborg.settings_valid:
    - config: {{ qborg | json }}
    - order: 1
    - failhard: True

qborg-dom0-policy:
  file.managed:
    - name: {{ qborg.paths.policy_dir }}/70-qborg.policy
    - source: salt://qborg/files/dom0/70-qborg.policy.j2
    - template: jinja
    - context:
        admin_vm: {{ qborg.admin_vm | json }}
        vms: {{ (qborg.vms or {}) | list | sort | json }}
        relay_vm: {{ qborg.relay_vm | json }}
        relayed_vms: {{ salt["qborg.relayed_vms"](qborg) | json }}
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - require:
      - qborg: qborg-dom0-pillar-valid

{#- pushes the non-secret settings to the admin qube (qborg.UpdateSettings),
    so a VM added to pillar and applied on its own is known there; runs
    only when the settings differ from the last push #}
qborg-dom0-admin-settings:
  qborg.admin_settings_pushed:
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-dom0-pillar-valid
