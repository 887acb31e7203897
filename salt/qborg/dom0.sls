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
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - require:
      - qborg: qborg-dom0-pillar-valid
