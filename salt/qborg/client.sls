{#- client part (a configured AppVM): its bundle over qrexec, the ssh alias,
    the borgmatic config, the schedule and the borgbak helper. Everything
    lands in the user's home or under the prefix (/usr/local), which persist
    in an AppVM. #}
{%- if grains["id"] == "dom0" %}
{{- raise("qborg's client part never runs in dom0: apply qborg, which picks dom0's own part") }}
{%- endif %}
{%- from "qborg/map.jinja" import qborg with context %}
{%- set vm = grains["id"] %}
{%- set account = salt["user.info"](qborg.user) or {} %}
{%- set home = account.get("home", "/home/" ~ qborg.user) %}
{%- set prefix = qborg.paths.prefix %}
{%- set conf = home ~ "/.config/qborg" %}
{%- set state_dir = home ~ "/.local/state/qborg" %}
{#- one call for every value computed from the pillar: under salt-ssh each
    salt[...] here is a round trip to the qube, and an error there comes back
    as data (Salt 3006), so the result says whether the pillar is valid #}
{%- set context = salt["qborg.client_context"](qborg) %}

qborg-client-pillar-valid:
  qborg.settings_valid:
    - config: {{ qborg | json }}
    - order: 1
    - failhard: True
{%- if context is not mapping or "valid" not in context %}

{#- the module gave no answer: nothing but this failure runs #}
{%- set unanswered = "qborg's execution module did not answer in this qube; install qborg"
                    ~ " from its release tarball into dom0's /srv/salt and run"
                    ~ " `qubesctl saltutil.sync_all`: " %}
qborg-client-module-answered:
  test.fail_without_changes:
    - comment: {{ (unanswered ~ (context | string)[:300]) | json }}
    - failhard: True
{%- elif not context.valid %}

{#- qborg-client-pillar-valid fails naming the field; if the pillar is
    valid, this qube is not one of qborg:vms #}
qborg-client-configured:
  test.fail_without_changes:
    - comment: {{ context.error | json }}
    - require:
      - qborg: qborg-client-pillar-valid
{%- else %}

qborg-client-bundle:
  qborg.bundle_installed:
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-client-pillar-valid

{#- directories in the home: qborg.home_directory_present refuses a symbolic link
    the user planted on the way, which file.directory (as root) follows #}
qborg-client-ssh-dir:
  qborg.home_directory_present:
    - name: {{ (home ~ "/.ssh") | json }}
    - user: {{ qborg.user | json }}
    - mode: '0700'
    - require:
      - qborg: qborg-client-pillar-valid

{#- the Host qborg block (and a Host qborg-<copy> block for each other
    server the qube keeps a copy on) first (ssh takes the first value it
    meets, so a Host * or Match of the user's cannot override it); every
    other line of the user's file kept byte for byte #}
qborg-client-ssh-config:
  qborg.ssh_config_managed:
    - name: {{ (home ~ "/.ssh/config") | json }}
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-client-ssh-dir

qborg-client-state-dir:
  qborg.home_directory_present:
    - name: {{ state_dir | json }}
    - user: {{ qborg.user | json }}
    - mode: '0700'
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-borgmatic-dir:
  qborg.home_directory_present:
    - name: {{ (home ~ "/.config/borgmatic.d") | json }}
    - user: {{ qborg.user | json }}
    - mode: '0700'
    - require:
      - qborg: qborg-client-pillar-valid

{#- one config per copy (qborg.yaml for the first server's, qborg-<copy>.yaml
    for another), rendered for the borgmatic the user runs (prefix/bin before
    PATH) and checked by that borgmatic's own validator before any replaces
    a file: a config borgmatic rejects never replaces a working one; the
    config of a server no longer assigned goes #}
qborg-client-borgmatic:
  qborg.borgmatic_config_managed:
    - name: {{ (home ~ "/.config/borgmatic.d/qborg.yaml") | json }}
    - config: {{ qborg | json }}
    - require:
      - qborg: qborg-client-borgmatic-dir

qborg-client-borgbak:
  file.managed:
    - name: {{ prefix }}/bin/borgbak
    - source: salt://qborg/files/client/borgbak.j2
    - template: jinja
    - context:
        conf: {{ conf | json }}
        state_dir: {{ state_dir | json }}
        interval: {{ context.interval | json }}
        stale_after: {{ context.stale_after | json }}
        copies: {{ context.copies | json }}
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

{#- the desktop notices of qborg-backup's runs (docs/usage.md#notices) #}
qborg-client-notify-program:
  file.managed:
    - name: {{ prefix }}/bin/qborg-notify
    - source: salt://qborg/files/client/qborg-notify
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - qborg: qborg-client-pillar-valid

qborg-client-drill-program:
  file.managed:
    - name: {{ prefix }}/bin/qborg-drill
    - source: salt://qborg/files/client/qborg-drill
    - user: root
    - group: root
    - mode: '0755'
    - makedirs: True
    - require:
      - qborg: qborg-client-pillar-valid

{#- cron fires every 5 minutes; qborg-backup backs up only when the last
    good backup is older than the interval, after a random wait, under a
    lock. The @reboot entry catches up soon after the qube starts. #}
{#- the prefix is a plain path (validate_settings), quoted all the same #}
{%- set backup_cmd = (prefix ~ "/bin/qborg-backup") | quote ~ " --scheduled --interval "
                     ~ context.interval | quote ~ " --notify " ~ context.notify | quote
                     ~ " --stale-after " ~ context.stale_after | quote %}
qborg-client-schedule:
  cron.present:
    - name: {{ (backup_cmd ~ " --jitter 120") | json }}
    - identifier: qborg-backup
    - user: {{ qborg.user }}
    - minute: '*/5'
    - comment: 'qborg: backs up when the last good backup is older than the interval'
    - require:
      - file: qborg-client-backup-program
      - file: qborg-client-notify-program
      - qborg: qborg-client-borgmatic
      - qborg: qborg-client-bundle

qborg-client-schedule-boot:
  cron.present:
    - name: {{ (backup_cmd ~ " --delay 60 --jitter 60") | json }}
    - identifier: qborg-backup-boot
    - user: {{ qborg.user }}
    - special: '@reboot'
    - comment: 'qborg: catches up soon after the qube starts'
    - require:
      - file: qborg-client-backup-program
      - file: qborg-client-notify-program
      - qborg: qborg-client-borgmatic
      - qborg: qborg-client-bundle

{#- Qubes starts cron at boot, and only when dom0 had enabled the crond
    service by then: in a qube running since before dom0's part enabled it,
    start cron now as Qubes would at boot; fail naming the fix when dom0
    has not enabled it #}
qborg-client-cron:
  qborg.cron_running:
    - name: {{ vm | json }}
    - require:
      - cron: qborg-client-schedule
      - cron: qborg-client-schedule-boot
{%- endif %}
