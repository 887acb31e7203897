"""Two copies for real: qborg-backup in a home set up by the client part's own
functions (each copy's key, passphrase and pinned host key, the managed
~/.ssh/config with `Host qborg` and `Host qborg-offsite`, each copy's
borgmatic config), run by /usr/bin/python3 with a real borgmatic (Debian's
1.7.7 and the newest) and real borg over real ssh to a real sshd on
127.0.0.1, whose key is locked by its forced command to `borg serve
--append-only` on the VM's repository. The second server is down (nothing
listens on its port): the first copy still gets its archive, the run fails,
and the status names the copy that failed."""

import os
import shutil
import socket
import subprocess
import time

import pytest

import _qborg_clientops as ops
import _qborg_keystore as keystore_mod
import _qborg_repos as repos_mod
import _qborg_servers as servers_mod
import _qborg_settings as settings_mod
from unit.test_qborg_backup import SCRIPT

from .test_services import SALT_DIR, render_jinja

VM = "vm-x"
LATEST = os.environ.get("QBORG_BORGMATIC_LATEST", "/opt/qborg-test/borgmatic-latest/bin/borgmatic")


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run(cmd, **kwargs):
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False,
                          **kwargs)
    assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
    return proc


@pytest.fixture
def sshd(tmp_path):
    """A real sshd on 127.0.0.1 for root with keys from its own file only."""
    base = tmp_path / "sshd"
    base.mkdir()
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(base / "host_key")])
    port = free_port()
    (base / "authorized_keys").write_text("")
    (base / "sshd_config").write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", f"HostKey {base / 'host_key'}",
        f"PidFile {base / 'pid'}", "UsePAM no", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PermitRootLogin forced-commands-only",
        "AllowUsers root", f"AuthorizedKeysFile {base / 'authorized_keys'}",
        "StrictModes no", "AllowTcpForwarding no", "X11Forwarding no", ""]))
    sshd_bin = shutil.which("sshd", path="/usr/sbin:/usr/bin:/sbin:/bin")
    proc = subprocess.Popen([sshd_bin, "-D", "-e", "-f", str(base / "sshd_config")],
                            stdout=subprocess.DEVNULL, stderr=open(base / "log", "wb"))
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), 1) as sock:
                    if sock.recv(64).startswith(b"SSH-2.0-"):
                        break
            except OSError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, \
                (base / "log").read_text()
            time.sleep(0.05)
        host_key = " ".join((base / "host_key.pub").read_text().split()[:2])
        yield {"port": port, "host_key": host_key, "authorized_keys": base / "authorized_keys"}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def versions():
    assert os.access(LATEST, os.X_OK), \
        f"{LATEST} is missing: `make borgmatic-latest` installs the current borgmatic there"
    latest = run([LATEST, "--version"]).stdout.strip()
    return {"/usr/bin/borgmatic": run(["/usr/bin/borgmatic", "--version"]).stdout.strip(),
            LATEST: latest}


@pytest.mark.parametrize("borgmatic", ["/usr/bin/borgmatic", LATEST])
def test_the_second_server_down_the_first_copy_still_gets_its_archive(sshd, tmp_path, merge,
                                                                      borgmatic):
    version = versions()[borgmatic]
    home = tmp_path / "home"
    (home / "Documents").mkdir(parents=True)
    (home / "Documents" / "letter.txt").write_text("dear server\n")
    down = free_port()  # nothing listens there: the second server is down
    raw = merge({
        "user": "root",
        "server": {"host": "127.0.0.1", "port": sshd["port"], "user": "root",
                   "host_key": sshd["host_key"]},
        "servers": {"offsite": {"host": "127.0.0.1", "port": down, "user": "root",
                                "host_key": sshd["host_key"]}},
        "vms": {VM: {"source_directories": ["~/Documents"]}}})
    settings = settings_mod.validate_settings(raw)

    # what the admin qube does: a key and passphrase per copy, the first
    # server's repository made, the VM's key locked to it
    srv = tmp_path / "srv"
    srv.mkdir()
    bundle = {}
    for name in servers_mod.vm_copies(settings, VM):
        server = servers_mod.vm_server(servers_mod.copy_settings(settings, name), VM)
        private, public = keystore_mod.generate_ssh_key(f"qborg:{VM}")
        bundle[name] = {"repository": servers_mod.repository_url(server, VM),
                        "remote_path": server["remote_path"], "ssh_private_key": private,
                        "known_hosts": f"{repos_mod.known_hosts_host(server)} {sshd['host_key']}",
                        "passphrase": keystore_mod.generate_passphrase(), "public": public}
    main = bundle["main"]
    repository = srv / "qborg" / VM
    repository.parent.mkdir()
    run(["borg", "init", "-e", "repokey", str(repository)],
        env=dict(os.environ, BORG_PASSPHRASE=main["passphrase"]))
    command = f"cd {srv} && {repos_mod.forced_command(settings['server'], VM)}"
    sshd["authorized_keys"].write_text(f'restrict,command="{command}" {main["public"]}\n')

    # what the client part does, with its own functions
    owner = (os.getuid(), os.getgid())
    fields = {name: {k: v for k, v in b.items() if k != "public"} for name, b in bundle.items()}
    ops.install_copies(settings, str(home), fields, owner, test=False)
    (home / ".ssh").mkdir(mode=0o700)
    (home / ".ssh" / "config").write_text(
        ops.render_ssh_config(None, ops.client_ssh_block(settings, VM, str(home))))
    (home / ".config" / "borgmatic.d").mkdir(parents=True)
    for name in bundle:
        path = ops.client_paths(settings, str(home), name)["borgmatic_config"]
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(ops.borgmatic_config_text(settings, VM, str(home), version, name))

    # installed as in a qube: qborg-backup, the borgmatic of the case beside
    # it, and ssh reading the user's ~/.ssh/config (ssh reads the home of
    # the passwd entry, root's here, not $HOME)
    bindir = tmp_path / "bin"
    bindir.mkdir()
    shutil.copy(SCRIPT, bindir / "qborg-backup")
    (bindir / "qborg-backup").chmod(0o755)
    os.symlink(borgmatic, bindir / "borgmatic")
    (bindir / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F {home}/.ssh/config "$@"\n')
    (bindir / "ssh").chmod(0o755)
    # borgbak as client.sls renders it, from the client part's context
    context = ops.client_context(raw, VM)
    template = SALT_DIR / "qborg" / "files" / "client" / "borgbak.j2"
    (bindir / "borgbak").write_text(render_jinja(template.read_text(), {
        "conf": f"{home}/.config/qborg", "state_dir": str(home / ".local" / "state" / "qborg"),
        "interval": context["interval"], "copies": context["copies"]}, template))
    (bindir / "borgbak").chmod(0o755)
    env = {"HOME": str(home), "PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"}

    def qborg_backup(*args):
        return subprocess.run(["/usr/bin/python3", str(bindir / "qborg-backup"), *args],
                              env=env, capture_output=True, text=True, timeout=600, check=False)

    proc = qborg_backup("--scheduled", "--interval", "1h")
    assert proc.returncode != 0, proc.stderr
    assert "qborg-backup: copy offsite: backup failed" in proc.stderr
    assert "copy main" not in proc.stderr, proc.stderr
    state = home / ".local" / "state" / "qborg"
    assert (state / "last-success").exists(), proc.stderr
    assert not (state / "last-error").exists(), (state / "last-error").read_text()
    error = (state / "copies" / "offsite" / "last-error").read_text()
    assert "the backup server could not be reached" in error and "Connection refused" in error
    assert not (state / "copies" / "offsite" / "last-success").exists()

    # the first copy's archive is on the first server, with the file in it
    borg_env = dict(os.environ, BORG_PASSPHRASE=main["passphrase"],
                    BORG_RELOCATED_REPO_ACCESS_IS_OK="yes", HOME=str(tmp_path / "admin"))
    archives = run(["borg", "list", "--short", str(repository)], env=borg_env).stdout.split()
    assert len(archives) == 1 and archives[0].startswith(f"{VM}-")
    listed = run(["borg", "list", "--short", f"{repository}::{archives[0]}"],
                 env=borg_env).stdout
    assert f"{str(home).lstrip('/')}/Documents/letter.txt" in listed.splitlines()

    status = qborg_backup("--status", "--interval", "1h")
    assert status.returncode == 0, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == "copy main: ok"
    assert lines[2] == "  last error: none"
    offsite = lines.index("copy offsite: STALE")
    assert lines[offsite + 1] == "  last successful backup: never"
    assert "the backup server could not be reached" in lines[offsite + 2]

    # the next tick: the first copy is not due, the second is tried again
    proc = qborg_backup("--scheduled", "--interval", "1h")
    assert proc.returncode != 0 and "copy offsite" in proc.stderr
    assert run(["borg", "list", "--short", str(repository)], env=borg_env).stdout.split() == \
        archives

    # borgbak: the first copy by default, another with --copy
    def borgbak(*args):
        return subprocess.run([str(bindir / "borgbak"), *args], cwd=str(tmp_path),
                              env=dict(env, PATH=f"{bindir}:/usr/bin:/bin"),
                              capture_output=True, text=True, timeout=300, check=False)

    listed = borgbak("list", "--short")
    assert (listed.returncode, listed.stdout.split()) == (0, archives), listed.stderr
    restore = tmp_path / "restore"
    restore.mkdir()
    extract = subprocess.run(
        [str(bindir / "borgbak"), "extract", archives[0],
         f"{str(home).lstrip('/')}/Documents/letter.txt"], cwd=str(restore),
        env=dict(env, PATH=f"{bindir}:/usr/bin:/bin"), capture_output=True, text=True,
        timeout=300, check=False)
    assert extract.returncode == 0, extract.stderr
    assert (restore / str(home).lstrip("/") / "Documents" / "letter.txt").read_text() == \
        "dear server\n"
    # (borg may end before it passes ssh's own words on; its debug log names
    # the ssh command line, with the copy's alias)
    offsite_list = borgbak("--copy", "offsite", "list", "--debug")
    assert offsite_list.returncode != 0
    assert "'ssh', 'qborg-offsite', 'borg', 'serve'" in offsite_list.stderr, offsite_list.stderr
    assert "Connection closed by remote host" in offsite_list.stderr
    assert borgbak("copies").stdout.splitlines() == [
        "main  ssh://qborg/./qborg/vm-x  (default)", "offsite  ssh://qborg-offsite/./qborg/vm-x"]
    status = borgbak("status")
    assert status.returncode == 0 and "copy main: ok" in status.stdout
    assert "copy offsite: STALE" in status.stdout
    only = borgbak("--copy", "offsite", "status")
    assert only.stdout.startswith("copy offsite: STALE\n") and "copy main" not in only.stdout
    wrong = borgbak("--copy", "elsewhere", "list")
    assert wrong.returncode == 2
    assert "no copy named 'elsewhere'; its copies: main, offsite" in wrong.stderr
