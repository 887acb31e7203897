{#- dom0 part: the qrexec policy that lets each configured VM ask the admin
    qube for its own bundle (and each offline VM reach the relay qube), the
    crond service on the qubes that back up or run maintenance, and the non-secret settings pushed to the admin qube.
    Never writes into a home, never reads a VM's output. #}
{%- from "qborg/map.jinja" import qborg with context %}
{#- names that are no qube name never reach a state id: the validation
    state below fails naming their pillar field, and nothing else runs #}
{%- set admin_vm = (salt["qborg.valid_qube_names"]([qborg.admin_vm]) or [none])[0] %}
{%- set vms = salt["qborg.valid_qube_names"]((qborg.vms or {}) | list | sort) %}
{#- every qube qborg names, with the pillar field that names it #}
{%- set named = {admin_vm: "qborg:admin_vm"} if admin_vm else {} %}
{%- for vm in vms %}
{%-   do named.update({vm: "qborg:vms:" ~ vm}) %}
{%- endfor %}
{#- offline qubes (`via: relay`, or `auto` without a netvm) reach the server
    through the relay qube #}
{%- set relay_vm = (salt["qborg.valid_qube_names"]([qborg.relay_vm]) or [none])[0] %}
{%- set relayed = salt["qborg.relayed_vms"](qborg) %}
{%- if relay_vm %}
{%-   do named.update({relay_vm: "qborg:relay_vm"}) %}
{%- endif %}

qborg-dom0-pillar-valid:
  qborg.settings_valid:
    - config: {{ qborg | json }}
    - order: 1
    - failhard: True

{#- a qube missing in dom0 fails the run before anything changes #}
qborg-dom0-qubes-exist:
  qborg.qubes_exist:
    - qubes: {{ named | json }}
    - require:
      - qborg: qborg-dom0-pillar-valid

{#- fully managed: a VM removed from pillar loses its line #}
qborg-dom0-policy:
  file.managed:
    - name: {{ qborg.paths.policy_dir }}/70-qborg.policy
    - source: salt://qborg/files/dom0/70-qborg.policy.j2
    - template: jinja
    - context:
        admin_vm: {{ admin_vm | json }}
        vms: {{ vms | json }}
        relay_vm: {{ relay_vm | json }}
        relayed_vms: {{ relayed | json }}
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - require:
      - qborg: qborg-dom0-qubes-exist

{#- the VMs' backup schedule and the admin qube's maintenance are crontab
    entries: cron runs in a qube only with the crond service enabled #}
{%- set admin = [admin_vm] if admin_vm else [] %}
{%- for qube in admin + vms %}

qborg-dom0-crond-{{ qube }}:
  qvm.service:
    - name: {{ qube | json }}
    - enable:
      - crond
    - require:
      - qborg: qborg-dom0-qubes-exist

{%- endfor %}

{#- a qube without a netvm cannot reach the server: a warning, not a failure;
    a relayed VM (`via: relay`, or `auto` without a netvm) is offline on
    purpose, the relay qube needs one #}
{%- for qube in (admin + vms + ([relay_vm] if relay_vm else [])) if qube not in relayed %}

qborg-dom0-netvm-{{ qube }}:
  qborg.vm_networked:
    - name: {{ qube | json }}
    - relay_hint: {{ (qube in vms) | json }}
    - require:
      - qborg: qborg-dom0-qubes-exist
{%- endfor %}

{#- pushes the non-secret settings to the admin qube (qborg.UpdateSettings),
    so a VM added to pillar and applied on its own is known there; runs
    only when the settings differ from the last push #}
qborg-dom0-admin-settings:
  qborg.admin_settings_pushed:
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-dom0-qubes-exist
