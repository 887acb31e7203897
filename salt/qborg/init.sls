{#- qborg: one entry point for every qube. qubesctl applies it to dom0 first,
    then to each target, so the part applied depends on the minion id:
    dom0 -> dom0 part, the admin qube -> admin part, a configured VM ->
    client part, a template -> package part, anything else -> nothing. #}
{#- the role is map.jinja's, the one place that decides it (clean.sls uses it too) #}
{%- from "qborg/map.jinja" import role with context %}
{%- set minion = grains["id"] %}
{%- set part = "" if role == "none" else role %}

{%- if part %}
include:
  - qborg.{{ part }}
{%- else %}
qborg-nothing-to-do:
  test.nop:
    - name: {{ (minion ~ " has no qborg role (not dom0, the admin qube, a configured VM or a template)") | json }}
{%- endif %}
