{#- qborg: one entry point for every qube. qubesctl applies it to dom0 first,
    then to each target, so the part applied depends on the minion id:
    dom0 -> dom0 part, the admin qube -> admin part, a configured VM ->
    client part, a template -> package part, anything else -> nothing. #}
{%- from "qborg/map.jinja" import qborg with context %}
{%- set minion = grains["id"] %}
{%- set is_template = salt["pillar.get"]("qubes:type") == "template"
                      or minion in (qborg.templates or []) %}
{%- if minion == "dom0" %}
{%- set part = "dom0" %}
{%- elif minion == qborg.admin_vm %}
{%- set part = "admin" %}
{%- elif qborg.relay_vm and minion == qborg.relay_vm %}
{#- the networked qube that carries offline VMs' ssh (qborg:relay_vm) #}
{%- set part = "relay" %}
{%- elif minion in (qborg.vms or {}) %}
{%- set part = "client" %}
{%- elif is_template %}
{%- set part = "template" %}
{%- else %}
{%- set part = "" %}
{%- endif %}

{%- if part %}
include:
  - qborg.{{ part }}
{%- else %}
qborg-nothing-to-do:
  test.nop:
    - name: {{ (minion ~ " has no qborg role (not dom0, the admin qube, a configured VM or a template)") | json }}
{%- endif %}
