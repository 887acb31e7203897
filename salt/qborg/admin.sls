{#- admin part (the admin qube): keystore, the qborg.GetBundle service and
    the programs it runs, then keys, authorized_keys and repositories. #}
{%- if grains["id"] == "dom0" %}
{{- raise("qborg's admin part never runs in dom0: apply qborg, which picks dom0's own part") }}
{%- endif %}
{%- from "qborg/map.jinja" import qborg with context %}
{%- set account = salt["user.info"](qborg.user) or {} %}
{%- set home = account.get("home", "/home/" ~ qborg.user) %}
{%- set prefix = qborg.paths.prefix %}

qborg-admin-pillar-valid:
  qborg.settings_valid:
    - config: {{ qborg | json }}
    - order: 1
    - failhard: True

{#- refuses a symbolic link the user planted on the way (see the client part) #}
qborg-admin-keystore:
  qborg.home_directory_present:
    - name: {{ (home ~ "/.local/share/qborg") | json }}
    - user: {{ qborg.user | json }}
    - mode: '0700'
    - require:
      - qborg: qborg-admin-pillar-valid

{#- the core the programs and services below run (their one static entry
    calls it): every _qborg_*.py module, compiled once, because the admin
    qube's user, who runs them, cannot write __pycache__ beside them #}
qborg-admin-core:
  qborg.core_installed:
    - name: {{ (prefix ~ "/lib/qborg") | json }}
    - require:
      - qborg: qborg-admin-pillar-valid

{#- owned by the admin qube's user: qborg.UpdateSettings (pushed from dom0)
    replaces it with the same serialisation #}
qborg-admin-settings:
  qborg.admin_settings_managed:
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-admin-pillar-valid

{#- one static entry, installed under each name; the name picks what runs #}
{%- set entries = {
      "qborg-admin-getbundle-service": "etc/qubes-rpc/qborg.GetBundle",
      "qborg-admin-updatesettings-service": "etc/qubes-rpc/qborg.UpdateSettings",
      "qborg-admin-program-qborg": "bin/qborg",
      "qborg-admin-program-qborg-maint": "bin/qborg-maint"} %}
{%- for id, path in entries | dictsort %}

{{ id }}:
  file.managed:
    - name: {{ (prefix ~ "/" ~ path) | json }}
    - source: salt://qborg/files/common/qborg-entry
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - qborg: qborg-admin-core
      - qborg: qborg-admin-settings
{%- endfor %}

qborg-admin-provisioned:
  qborg.admin_provisioned:
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-admin-keystore

{#- maintenance: the qborg command, the scheduled audit/prune/compact/check #}
qborg-admin-maintenance-valid:
  qborg.maintenance_valid:
    - config: {{ qborg | json }}
    - order: 1
    - failhard: True

qborg-admin-maint-schedule:
  cron.present:
    - name: {{ ((prefix ~ "/bin/qborg-maint") | quote ~ " --scheduled") | json }}
    - identifier: qborg-maint
    - user: {{ qborg.user }}
    - minute: '17'
    - comment: 'qborg: audit, prune, compact, check when the last run is older than qborg:maintenance:interval'
    - require:
      - file: qborg-admin-program-qborg-maint
      - qborg: qborg-admin-maintenance-valid
      - qborg: qborg-admin-provisioned

{#- cron runs the maintenance only once started: see qborg-client-cron #}
qborg-admin-cron:
  qborg.cron_running:
    - name: {{ grains["id"] | json }}
    - require:
      - cron: qborg-admin-maint-schedule
