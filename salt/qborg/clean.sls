{#- qborg.clean: takes qborg's part out of the qube it is applied to, picked
    as `qborg` picks it (map.jinja's role): a VM's schedule, programs,
    borgmatic config, ssh alias and bundle; the admin qube's schedule,
    services and programs; the relay qube's service. The admin qube's
    keystore and audit ledger stay unless qborg:clean:delete_keystore names
    that qube: they are the only way to read the backups. A qube qborg no
    longer names (removed from pillar) gets every qube part's removal, its
    ledger kept while a keystore sits beside it. dom0 keeps its part (the
    policy every other qube needs) unless qborg:clean:dom0 is true; a
    template keeps its packages. Nothing on the server is touched.
    Safe to repeat; test=True changes nothing. See docs/removing.md. #}
{%- from "qborg/map.jinja" import qborg, packages, role with context %}
{%- set minion = grains["id"] %}
{%- set clean = qborg.get("clean") or {} %}
{%- if clean is not mapping %}
{{- raise("qborg:clean: must be a mapping (dom0, delete_keystore), not " ~ (clean | string)[:80]) }}
{%- endif %}
{%- set dom0_too = clean.get("dom0", false) %}
{%- if dom0_too is not sameas true and dom0_too is not sameas false %}
{{- raise("qborg:clean:dom0: must be true or false, not " ~ (dom0_too | string)[:80]) }}
{%- endif %}
{%- set delete_keystore = clean.get("delete_keystore") %}
{%- if delete_keystore is not none and delete_keystore is not sameas false
       and delete_keystore is not string %}
{{- raise("qborg:clean:delete_keystore: name the admin qube whose keystore and ledger"
          ~ " qborg.clean deletes (e.g. " ~ qborg.admin_vm ~ "), not " ~ (delete_keystore | string)[:80]) }}
{%- endif %}
{#- the paths reach file.absent and the user's shell: plain ones only #}
{%- for key in ["prefix", "policy_dir"] %}
{%-   set path = qborg.paths[key] %}
{%-   if path is not string or (path | regex_match("(/[A-Za-z0-9_./-]*)$") or [none])[0] != path
         or "/../" in path ~ "/" or "/./" in path ~ "/" or "//" in path %}
{{-     raise("qborg:paths:" ~ key ~ ": " ~ (path | string)[:80] ~ " must be a plain absolute"
              ~ " path such as /usr/local") }}
{%-   endif %}
{%- endfor %}
{%- if qborg.user is not string or (qborg.user | regex_match("([a-z_][a-z0-9_-]*)$") or [none])[0] != qborg.user %}
{{- raise("qborg:user: " ~ (qborg.user | string)[:80] ~ " is not a unix user name") }}
{%- endif %}
{%- set parts = {"client": ["client"], "admin": ["admin"], "relay": ["relay"],
                 "none": ["client", "admin", "relay"]}.get(role, []) %}
{%- set prefix = qborg.paths.prefix %}
{%- set account = (salt["user.info"](qborg.user) or {}) if parts else {} %}
{%- set home = account.get("home", "/home/" ~ qborg.user) %}
{%- set keystore = home ~ "/.local/share/qborg" %}
{%- set state_dir = home ~ "/.local/state/qborg" %}
{%- set deletes_keystore = delete_keystore == minion and ("admin" in parts) %}
{#- what each part installed: crontab entries (identifier, @special), root's
    files under the prefix, the user's files in the home #}
{%- set crons = [] %}
{%- set root_paths = [] %}
{%- set home_paths = [] %}
{%- if "client" in parts %}
{%-   do crons.extend([["qborg-backup", none], ["qborg-backup-boot", "@reboot"]]) %}
{%-   do root_paths.extend(["bin/qborg-backup", "bin/qborg-drill", "bin/borgbak"]) %}
{#-   the bundle (key, passphrase, pinned host key): copies of the admin
      qube's keystore, which keeps them #}
{%-   do home_paths.extend([".config/borgmatic.d/qborg.yaml", ".config/qborg"]) %}
{#-   the config of each other server's copy (qborg-<server>.yaml); a name
      that is no server name never reaches a path #}
{%-   for name in qborg.get("servers") or {} %}
{%-     if name is string and name | regex_match("^([a-z][a-z0-9-]{0,15})$") %}
{%-       do home_paths.append(".config/borgmatic.d/qborg-" ~ name ~ ".yaml") %}
{%-     endif %}
{%-   endfor %}
{%- endif %}
{%- if "admin" in parts %}
{%-   do crons.append(["qborg-maint", none]) %}
{%-   do root_paths.extend(["bin/qborg", "bin/qborg-maint", "etc/qubes-rpc/qborg.GetBundle",
                            "etc/qubes-rpc/qborg.UpdateSettings"]) %}
{%- endif %}
{%- if "relay" in parts %}
{%-   do root_paths.append("etc/qubes-rpc/qborg.SshRelay") %}
{%- endif %}
{%- if "admin" in parts or "relay" in parts %}
{#-   the libraries and the settings (admin.json, relay.json): nothing but qborg's #}
{%-   do root_paths.extend(["lib/qborg", "etc/qborg"]) %}
{%- endif %}
{#- removes the managed Host qborg block (a `# BEGIN qborg` line up to the
    next `# END qborg`, as the client part finds it), every other byte kept;
    with --check, exits 0 only when there is one to remove #}
{%- set ssh_block_script -%}
import os, sys
path = os.path.realpath(sys.argv[1])
if not os.path.isfile(path):
    sys.exit(1)
with open(path, encoding="utf-8", errors="surrogateescape", newline="") as f:
    lines = f.read().splitlines(True)
out, i, found = [], 0, False
while i < len(lines):
    if lines[i].startswith("# BEGIN qborg"):
        end = [k for k in range(i + 1, len(lines)) if lines[k].rstrip("\r\n") == "# END qborg"]
        if end:
            i, found = end[0] + 1, True
            continue
    out.append(lines[i])
    i += 1
if sys.argv[2:] == ["--check"]:
    sys.exit(0 if found else 1)
with open(path + ".qborg-clean", "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
    f.write("".join(out))
os.chmod(path + ".qborg-clean", os.stat(path).st_mode & 0o7777)
os.replace(path + ".qborg-clean", path)
{%- endset %}
{%- set ssh_config = home ~ "/.ssh/config" %}
{%- set ssh_block = "/usr/bin/python3 -c " ~ (ssh_block_script | quote) ~ " " ~ (ssh_config | quote) %}
{%- if role == "dom0" and dom0_too %}

qborg-clean-dom0-policy:
  file.absent:
    - name: {{ (qborg.paths.policy_dir ~ "/70-qborg.policy") | json }}

{#- what dom0 last pushed to the admin qube (pushed-to-<admin>.json) #}
qborg-clean-dom0-pushed-settings:
  file.absent:
    - name: {{ (prefix ~ "/etc/qborg") | json }}
{%- elif role == "dom0" %}

{%- set dom0_pillar = {"qborg": {"clean": {"dom0": true} } } | json %}
qborg-clean-dom0-kept:
  test.succeed_without_changes:
    - comment: {{ ("dom0 keeps qborg's policy, which every configured qube needs; to remove"
                   ~ " it too (after cleaning the qubes): sudo qubesctl state.apply"
                   ~ " qborg.clean pillar='" ~ dom0_pillar ~ "'") | json }}
{%- elif role == "template" %}

qborg-clean-template-kept:
  test.succeed_without_changes:
    - comment: >-
        {{ minion }} keeps its packages ({{ ((packages.base + packages.admin) if packages else []) | join(", ") }}):
        other programs may use them; remove those you no longer need with
        the template's package manager
{%- else %}
{%- for identifier, special in crons %}

qborg-clean-cron-{{ identifier }}:
  cron.absent:
    - name: {{ identifier }}
    - identifier: {{ identifier }}
{%- if special %}
    - special: {{ special | json }}
{%- endif %}
    - user: {{ qborg.user | json }}
    - onlyif: command -v crontab
{%- endfor %}
{%- for path in root_paths %}

qborg-clean-{{ path }}:
  file.absent:
    - name: {{ (prefix ~ "/" ~ path) | json }}
{%- endfor %}
{%- if "client" in parts %}

{#- in the user's files, as the user: a link the user planted leads only
    where the user could write anyway #}
qborg-clean-ssh-config:
  cmd.run:
    - name: {{ ssh_block | json }}
    - onlyif: {{ (ssh_block ~ " --check") | json }}
    - runas: {{ qborg.user | json }}
{%- endif %}
{%- if deletes_keystore %}
{%-   do home_paths.extend([".local/share/qborg", ".local/state/qborg"]) %}
{%- endif %}
{%- for path in home_paths %}
{%-   set full = (home ~ "/" ~ path) | quote %}

qborg-clean-~/{{ path }}:
  cmd.run:
    - name: {{ ("rm -rf -- " ~ full) | json }}
    - onlyif: {{ ("test -e " ~ full ~ " || test -L " ~ full) | json }}
    - runas: {{ qborg.user | json }}
{%- endfor %}
{%- if "client" in parts and not deletes_keystore %}

{#- a VM's logs and last-backup record; kept where a keystore sits beside
    it (the admin qube's audit ledger) #}
{%- set full = state_dir | quote %}
qborg-clean-~/.local/state/qborg:
  cmd.run:
    - name: {{ ("rm -rf -- " ~ full) | json }}
    - onlyif: {{ ("test -e " ~ full ~ " || test -L " ~ full) | json }}
    - unless: {{ ("test -e " ~ (keystore | quote) ~ " || test -L " ~ (keystore | quote)) | json }}
    - runas: {{ qborg.user | json }}
{%- endif %}
{%- set kept = ["qborg.clean touches nothing on the server: the repositories stay"] %}
{%- if "client" in parts %}
{%-   do kept.append("this VM's key and passphrase stay in the admin qube's keystore") %}
{%- endif %}
{%- if "admin" in parts and not deletes_keystore %}
{%-   do kept.append("the keystore " ~ keystore ~ " (every VM's key, passphrase and exported"
                     ~ " repository key: the only way to read the backups) and the audit"
                     ~ " ledger " ~ state_dir ~ " are kept; qborg:clean:delete_keystore: "
                     ~ minion ~ " deletes them") %}
{%- endif %}

qborg-clean-kept:
  test.succeed_without_changes:
    - comment: {{ (kept | join("; ") ~ " (docs/removing.md)") | json }}
{%- endif %}
