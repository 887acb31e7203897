{#- client part (a configured AppVM): its bundle over qrexec, the ssh alias,
    the borgmatic config, the schedule and the borgbak helper. Everything
    lands in the user's home or under the prefix (/usr/local), which persist
    in an AppVM. #}
{%- from "qborg/map.jinja" import qborg with context %}
{%- set vm = grains["id"] %}
{%- set account = salt["user.info"](qborg.user) or {} %}
{%- set home = account.get("home", "/home/" ~ qborg.user) %}
{%- set group = account.get("gid", qborg.user) %}
{%- set prefix = qborg.paths.prefix %}
{%- set conf = home ~ "/.config/qborg" %}
{%- set state_dir = home ~ "/.local/state/qborg" %}
{#- validated at render time: a bad pillar stops the run before any state #}
{%- set settings = salt["qborg.validate"](qborg) %}
{%- set vm_settings = settings.vms[vm] %}

qborg-client-pillar-valid:
  qborg.settings_valid:
    - config: {{ qborg | json }}
    - order: 1
    - failhard: True

qborg-client-bundle:
  qborg.client_bundle:
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-ssh-dir:
  file.directory:
    - name: {{ home }}/.ssh
    - user: {{ qborg.user }}
    - group: {{ group }}
    - mode: '0700'
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-ssh-config-file:
  file.managed:
    - name: {{ home }}/.ssh/config
    - user: {{ qborg.user }}
    - group: {{ group }}
    - mode: '0600'
    - replace: False
    - require:
      - file: qborg-client-ssh-dir

qborg-client-ssh-config:
  file.blockreplace:
    - name: {{ home }}/.ssh/config
    - marker_start: '# BEGIN qborg (managed by Salt; edit pillar instead)'
    - marker_end: '# END qborg'
    - content: {{ salt["qborg.ssh_config_block"](qborg) | json }}
    - prepend_if_not_found: True
    - show_changes: True
    - require:
      - file: qborg-client-ssh-config-file

qborg-client-state-dir:
  file.directory:
    - name: {{ state_dir }}
    - user: {{ qborg.user }}
    - group: {{ group }}
    - mode: '0700'
    - makedirs: True
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-borgmatic-dir:
  file.directory:
    - name: {{ home }}/.config/borgmatic.d
    - user: {{ qborg.user }}
    - group: {{ group }}
    - mode: '0700'
    - makedirs: True
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-borgmatic:
  file.managed:
    - name: {{ home }}/.config/borgmatic.d/qborg.yaml
    - contents: {{ salt["qborg.borgmatic_config"](qborg) | json }}
    - check_cmd: {{ salt["qborg.borgmatic_validate_command"]() | json }}
    - user: {{ qborg.user }}
    - group: {{ group }}
    - mode: '0600'
    - require:
      - file: qborg-client-borgmatic-dir

qborg-client-borgbak:
  file.managed:
    - name: {{ prefix }}/bin/borgbak
    - source: salt://qborg/files/client/borgbak.j2
    - template: jinja
    - context:
        conf: {{ conf | json }}
        state_dir: {{ state_dir | json }}
        repository: {{ salt["qborg.client_repository"](qborg) | json }}
        remote_path: {{ settings.server.remote_path | json }}
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-backup-program:
  file.managed:
    - name: {{ prefix }}/bin/qborg-backup
    - source: salt://qborg/files/client/qborg-backup
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-schedule:
  cron.present:
    - name: {{ (prefix ~ "/bin/qborg-backup --scheduled --interval " ~ vm_settings.interval) | json }}
    - identifier: qborg-backup
    - user: {{ qborg.user }}
    - minute: '*/5'
    - comment: 'qborg: backs up when the last good backup is older than the interval'
    - require:
      - file: qborg-client-backup-program
      - file: qborg-client-borgmatic
      - qborg: qborg-client-bundle
