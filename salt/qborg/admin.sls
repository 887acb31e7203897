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
  qborg.home_directory:
    - name: {{ (home ~ "/.local/share/qborg") | json }}
    - user: {{ qborg.user | json }}
    - mode: '0700'
    - require:
      - qborg: qborg-admin-pillar-valid

{%- for lib in ["qborg_core", "qborg_admin"] %}

qborg-admin-lib-{{ lib }}:
  file.managed:
    - name: {{ prefix }}/lib/qborg/{{ lib }}.py
    - source: salt://_utils/{{ lib }}.py
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - require:
      - qborg: qborg-admin-pillar-valid
{%- endfor %}

{#- owned by the admin qube's user: qborg.UpdateSettings (pushed from dom0)
    replaces it with the same serialisation #}
qborg-admin-settings:
  qborg.admin_settings:
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-admin-pillar-valid

qborg-admin-getbundle-service:
  file.managed:
    - name: {{ prefix }}/etc/qubes-rpc/qborg.GetBundle
    - source: salt://qborg/files/admin/qborg.GetBundle.j2
    - template: jinja
    - context:
        lib_dir: {{ (prefix ~ "/lib/qborg") | json }}
        settings: {{ (prefix ~ "/etc/qborg/admin.json") | json }}
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - file: qborg-admin-lib-qborg_core
      - file: qborg-admin-lib-qborg_admin
      - qborg: qborg-admin-settings

qborg-admin-updatesettings-service:
  file.managed:
    - name: {{ prefix }}/etc/qubes-rpc/qborg.UpdateSettings
    - source: salt://qborg/files/admin/qborg.UpdateSettings.j2
    - template: jinja
    - context:
        lib_dir: {{ (prefix ~ "/lib/qborg") | json }}
        settings: {{ (prefix ~ "/etc/qborg/admin.json") | json }}
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - file: qborg-admin-lib-qborg_core
      - file: qborg-admin-lib-qborg_admin
      - qborg: qborg-admin-settings

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

qborg-admin-lib-qborg_maint:
  file.managed:
    - name: {{ prefix }}/lib/qborg/qborg_maint.py
    - source: salt://_utils/qborg_maint.py
    - user: root
    - group: root
    - mode: '0644'
    - makedirs: True
    - require:
      - qborg: qborg-admin-pillar-valid
    - require_in:
      - file: qborg-admin-getbundle-service

{#- the services and programs run as the admin qube's user, who cannot write
    __pycache__ beside these root-owned modules: compiled here once, or each
    qborg.GetBundle request compiles all three again #}
qborg-admin-lib-compiled:
  cmd.run:
    - name: {{ ("/usr/bin/python3 -m compileall -q " ~ ((prefix ~ "/lib/qborg") | quote)) | json }}
    - onchanges:
      - file: qborg-admin-lib-qborg_core
      - file: qborg-admin-lib-qborg_admin
      - file: qborg-admin-lib-qborg_maint
    - require_in:
      - file: qborg-admin-getbundle-service

{%- for program in ["qborg", "qborg-maint"] %}

qborg-admin-program-{{ program }}:
  file.managed:
    - name: {{ prefix }}/bin/{{ program }}
    - source: salt://qborg/files/admin/{{ program }}.j2
    - template: jinja
    - context:
        lib_dir: {{ (prefix ~ "/lib/qborg") | json }}
        settings: {{ (prefix ~ "/etc/qborg/admin.json") | json }}
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - file: qborg-admin-lib-qborg_maint
      - qborg: qborg-admin-settings
{%- endfor %}

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
