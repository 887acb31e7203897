"""The backup servers of qborg:server and qborg:servers, each VM's
repository on each of them, and each server's copy of the settings
(copy_settings): a VM keeps one copy of its backups on every server it is
assigned.
"""

import posixpath
import re

from _qborg_base import QborgConfigError, require


SERVER_USER_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}\Z")



HOSTNAME_RE = re.compile(r"^(?=.{1,253}\Z)[A-Za-z0-9]([A-Za-z0-9-]{0,62})(\.[A-Za-z0-9]([A-Za-z0-9-]{0,62}))*\.?\Z")



REMOTE_PATH_RE = re.compile(r"^[A-Za-z0-9_./+-]{1,200}\Z")



REPOS_DIR_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_./-]{0,200}\Z")



HOST_KEY_RE = re.compile(
    r"^(ssh-ed25519|ecdsa-sha2-nistp256|ecdsa-sha2-nistp384|ecdsa-sha2-nistp521|ssh-rsa)"
    r" [A-Za-z0-9+/]+={0,3}\Z"
)



# the fields of qborg:server and of each server under qborg:servers
SERVER_KEYS = ("provider", "host", "user", "port", "remote_path", "repos_dir", "host_key",
               "admin_key")



# a server's name: the copy's name in paths, the ssh alias qborg-<name>,
# borgbak --copy and qrexec service arguments
COPY_NAME_RE = re.compile(r"^[a-z][a-z0-9-]{0,15}\Z")



# qborg:installation: it names this admin qube's authorized_keys block
# (`# BEGIN qborg NAME`), its keys' comments and the directory of its
# repositories (<repos_dir>/NAME/<vm>), so one word, no separator
INSTALLATION_NAME = r"[a-z][a-z0-9-]{0,23}"


INSTALLATION_RE = re.compile(rf"^{INSTALLATION_NAME}\Z")


# the name of qborg:server unless qborg:server:name sets one
DEFAULT_COPY = "main"



# Presets per provider. Values the user sets explicitly in pillar win.
PROVIDERS = {
    "generic": {"port": 22, "remote_path": "borg", "upload": True},
    "rsync.net": {"port": 22, "remote_path": "borg14", "upload": True},
    "hetzner": {"port": 23, "remote_path": "borg-1.4", "upload": True},
    "borgbase": {"port": 22, "remote_path": "borg", "upload": False, "per_vm_repository": True,
                 "host": "repo.borgbase.com", "user": "borgbase",
                 # BorgBase asks for `borg check` at most monthly
                 "checks_at_most_every": "1 month"},
}


# a repository at BorgBase, whatever qborg:server:provider says
BORGBASE_HOST_RE = re.compile(r"(^|\.)repo\.borgbase\.com\.?\Z", re.I)



def check_copy_name(name, field):
    require(isinstance(name, str) and COPY_NAME_RE.match(name), field,
            f"{name!r} is not a server name: a lower-case letter, then up to 15 lower-case "
            f"letters, digits or '-' (it names the copy in borgbak --copy and in file names)")
    return name



def server_settings(srv, field, name, installation=None):
    """One server of qborg:server (the first) or qborg:servers:<name>,
    validated, its provider's presets filled in; errors name `field`."""
    require(isinstance(srv, dict), field, "missing or not a mapping")
    for key in srv:
        require(key in SERVER_KEYS or (key == "name" and field == "qborg:server"),
                f"{field}:{key}", f"unknown setting (known: {', '.join(SERVER_KEYS)})")
    provider = srv.get("provider") or "generic"
    require(isinstance(provider, str) and provider in PROVIDERS, f"{field}:provider",
            f"{provider!r} is unknown (known: {', '.join(PROVIDERS)})")
    preset = PROVIDERS[provider]
    host = srv.get("host")
    server_user = srv.get("user")
    if preset.get("per_vm_repository") and host is None and server_user is None:
        # BorgBase: one account per repository, set per VM (vms:<vm>:repository)
        host, server_user = preset["host"], preset["user"]
    require(isinstance(host, str) and HOSTNAME_RE.match(host), f"{field}:host",
            f"{host!r} is not a host name or IPv4 address")
    require(isinstance(server_user, str) and SERVER_USER_RE.match(server_user),
            f"{field}:user", f"{server_user!r} is not a valid account name")
    port = srv.get("port") if srv.get("port") is not None else preset["port"]
    require(isinstance(port, int) and not isinstance(port, bool) and 0 < port < 65536,
            f"{field}:port", f"{port!r} is not a TCP port number")
    remote_path = srv.get("remote_path") or preset["remote_path"]
    require(isinstance(remote_path, str) and REMOTE_PATH_RE.match(remote_path),
            f"{field}:remote_path", f"{remote_path!r} is not a borg command path")
    repos_dir = srv.get("repos_dir") or "qborg"
    require(isinstance(repos_dir, str) and REPOS_DIR_RE.match(repos_dir)
            and ".." not in repos_dir.split("/"),
            f"{field}:repos_dir", f"{repos_dir!r} must be a relative path without '..'")
    repos_dir = repos_dir.strip("/")
    host_key = srv.get("host_key") or None
    if host_key is not None:
        # one line of the server's ssh_host_*_key.pub: its comment may stay,
        # but a second line or any control character (a known_hosts line
        # smuggled into the VMs' bundles) is refused, not silently cut off
        require(isinstance(host_key, str) and host_key.strip()
                and not any(ord(c) < 32 or ord(c) == 127 for c in host_key.strip()),
                f"{field}:host_key",
                "must be one line 'TYPE BASE64' as in the server's ssh_host_*_key.pub "
                "(no line break or control character)")
        host_key = " ".join(str(host_key).split()[:2])
        require(HOST_KEY_RE.match(host_key), f"{field}:host_key",
                "must be 'TYPE BASE64' as in the server's ssh_host_*_key.pub")
    admin_key = srv.get("admin_key") or "~/.ssh/qborg-admin"
    require(isinstance(admin_key, str) and "\n" not in admin_key
            and (admin_key.startswith("/") or admin_key.startswith("~/")),
            f"{field}:admin_key", "must be an absolute path or start with ~/")

    return {
        "name": name, "field": field, "provider": provider, "host": host,
        "user": server_user, "port": port, "remote_path": remote_path, "repos_dir": repos_dir,
        "host_key": host_key, "admin_key": admin_key, "upload": preset["upload"],
        # repository_path and the block markers read it from the server
        "installation": installation,
    }



def check_installation(value):
    """qborg:installation: None (unset or empty: the one installation on
    its server account, as before names existed) or a short name."""
    if value is None or value == "":
        return None
    require(isinstance(value, str) and INSTALLATION_RE.match(value), "qborg:installation",
            f"{str(value)[:40]!r} is not an installation name: 1 to 24 lower-case letters, "
            f"digits and '-', starting with a letter (e.g. laptop), or null for none")
    return value


def default_repositories_dir(server):
    """Where the VMs without a repository of their own get one:
    <repos_dir>, or <repos_dir>/<installation> for a named installation."""
    if server.get("installation"):
        return f"{server['repos_dir']}/{server['installation']}"
    return server["repos_dir"]


def servers_settings(raw, installation=None):
    """[the first server (qborg:server), then qborg:servers in name order]:
    each VM keeps a copy of its backups on every server it is assigned."""
    srv = raw.get("server")
    require(isinstance(srv, dict), "qborg:server", "missing or not a mapping")
    first = srv.get("name") or DEFAULT_COPY
    check_copy_name(first, "qborg:server:name")
    servers = [server_settings(srv, "qborg:server", first, installation)]
    more = raw.get("servers") or {}
    require(isinstance(more, dict), "qborg:servers",
            "must be a mapping of server names to servers like qborg:server (or {})")
    for name in sorted(more, key=str):
        check_copy_name(name, f"qborg:servers:{name}")
        require(name != first, f"qborg:servers:{name}",
                f"{name!r} is already the name of qborg:server (qborg:server:name); "
                f"give this server another name")
        servers.append(server_settings(more[name], f"qborg:servers:{name}", name, installation))
    return servers



def check_copy(settings):
    """The VMs of one server, as its projection (copy_settings) holds them:
    the provider's rules, pinned host keys, repositories apart."""
    server = settings["server"]
    provider, host, port, host_key = (server[k] for k in ("provider", "host", "port", "host_key"))
    for name, vm in settings["vms"].items():
        field = repository_field(settings, name)
        if PROVIDERS[provider].get("per_vm_repository"):
            require(vm["repository"], field,
                    f"provider {provider} needs each VM's repository URL, e.g. "
                    f"ssh://abcd1234@abcd1234.repo.borgbase.com/./repo")
            require(host_key is not None, f"{server['field']}:host_key",
                    f"provider {provider}: pin the provider's published host key "
                    f"(qborg never logs in there with a full-access key to learn it)")
        if vm["repository"] and host_key is None:
            own = parse_repository_url(vm["repository"], field)
            require((own["host"], own["port"] or port) == (host, port),
                    f"{server['field']}:host_key",
                    f"{name}'s repository is on {own['host']}:{own['port'] or port}, not on "
                    f"the server {host}:{port}: pin that server's host key here ('TYPE "
                    f"BASE64' from its ssh_host_*_key.pub), as qborg learns only the "
                    f"server's own key on first use")
    check_repositories_apart(settings)



def copy_settings(settings, name):
    """The settings as one server's copy sees them, in the shape a single
    server has: `server` is that server, `vms` only the VMs it keeps a copy
    of, each with its `repository` there; `copy` names it. Keystore,
    ledger and maintenance state of a copy other than the first live apart
    (admin_paths, maint_paths)."""
    server = next((s for s in settings["servers"] if s["name"] == name), None)
    if server is None:
        raise QborgConfigError(f"{name!r} is not one of the servers (qborg:server:name, "
                               f"qborg:servers): {', '.join(copy_names(settings))}")
    vms = {vm: dict(values, repository=values["repositories"].get(name))
           for vm, values in settings["vms"].items() if name in values["servers"]}
    return dict(settings, server=server, vms=vms, copy=name)



def copy_names(settings):
    """The servers' names, the first (qborg:server) first."""
    return [server["name"] for server in settings["servers"]]



def vm_copies(settings, vm):
    """The names of the servers vm keeps a copy on, the first server first."""
    return [name for name in copy_names(settings) if name in settings["vms"][vm]["servers"]]



def is_first_copy(settings):
    """True for the settings themselves and the first server's projection:
    its files keep the places a single server always had."""
    return "copy" not in settings or settings["copy"] == settings["servers"][0]["name"]



def copy_key(settings):
    """None for the first server's copy (its files keep the places a single
    server always had), else the copy's name, which sets its files apart."""
    return None if is_first_copy(settings) else settings["copy"]


def copy_label(settings, vm):
    """How logs, status and results name vm's copy on this server: the VM's
    name for the first server's, VM@server for another's."""
    key = copy_key(settings)
    return vm if key is None else f"{vm}@{key}"


def repository_field(settings, vm):
    """The pillar field that sets vm's repository on this copy's server."""
    if is_first_copy(settings):
        return f"qborg:vms:{vm}:repository"
    return f"qborg:vms:{vm}:repository:{settings['copy']}"



def normalise_repository_path(path):
    """A repository path relative to the account's home, spelled one way:
    no './', no '//', no trailing '/' ('qborg/./vm-a//' -> 'qborg/vm-a')."""
    return posixpath.normpath("/" + str(path)).lstrip("/")



def repository_location(settings, vm):
    """Where vm's repository is: (user, host, port, normalised path), its
    `repository` or <repos_dir>/<vm> on the server's account. Host names
    compare without case and trailing dot."""
    server = vm_server(settings, vm)
    return (server["user"], server["host"].lower().rstrip("."), server["port"],
            normalise_repository_path(repository_path(server, vm)))



def check_repositories_apart(settings):
    """Every VM has a repository of its own: no two VMs on the same
    repository, none inside another's, and none that is (or holds) the
    server's repos_dir, where every VM without `repository` gets its own.
    A VM's key is locked to its repository path, and inside it borg serve
    lets that key delete objects without the passphrase, so a shared or
    nested repository would hand one VM the other's backups."""
    server = settings["server"]
    home = (server["user"], server["host"].lower().rstrip("."), server["port"])
    # a named installation's VMs get theirs under <repos_dir>/<installation>
    repos_dir = normalise_repository_path(default_repositories_dir(server))
    dir_name = (f"{server['field']}:repos_dir" if not server.get("installation")
                else f"<{server['field']}:repos_dir>/<qborg:installation>")
    where = {vm: repository_location(settings, vm) for vm in sorted(settings["vms"])}

    def field(vm):
        return repository_field(settings, vm)

    def origin(vm):
        if settings["vms"][vm]["repository"]:
            return field(vm)
        return f"its default place under {dir_name}"

    def url(vm):
        return repository_url(vm_server(settings, vm), vm)

    why = ("each VM needs a repository of its own (a VM's key may delete anything inside "
           "its repository, so one VM could destroy another's backups)")
    for vm, (user, host, port, path) in where.items():
        if settings["vms"][vm]["repository"] and (user, host, port) == home and (
                path == repos_dir or repos_dir.startswith(path + "/")):
            what = (f"is {dir_name} itself" if path == repos_dir
                    else f"contains {dir_name} ({default_repositories_dir(server)})")
            require(False, field(vm),
                    f"{url(vm)} {what}, where every VM without a repository of its own gets "
                    f"one ({default_repositories_dir(server)}/<vm>); {why}")
    # every path once, then each path's parents: same or nested in one pass
    by_path = {}
    for vm, location in where.items():
        other = by_path.setdefault(location, vm)
        if other != vm:
            # name the VM whose own `repository` setting is the slip
            mine, theirs = (vm, other) if settings["vms"][vm]["repository"] else (other, vm)
            require(False, field(mine),
                    f"{url(mine)} is the same repository as {theirs}'s ({url(theirs)}, "
                    f"{origin(theirs)}); {why}")
    for vm, (user, host, port, path) in where.items():
        parts = path.split("/")
        for depth in range(1, len(parts)):
            outer = by_path.get((user, host, port, "/".join(parts[:depth])))
            if outer is None:
                continue
            if settings["vms"][vm]["repository"]:
                require(False, field(vm),
                        f"{url(vm)} is inside {outer}'s repository ({url(outer)}, "
                        f"{origin(outer)}); {why}")
            require(False, field(outer),
                    f"{url(outer)} contains {vm}'s repository ({url(vm)}, {origin(vm)}); {why}")



def repository_path(server, vm):
    # a per-VM repository (vm_server) carries its own path
    return server.get("repository_path") or f"{default_repositories_dir(server)}/{vm}"



def repository_url(server, vm):
    return f"ssh://{server['user']}@{server['host']}:{server['port']}/./{repository_path(server, vm)}"



REPOSITORY_URL_RE = re.compile(
    r"^ssh://([A-Za-z0-9_][A-Za-z0-9_.-]{0,63})@([A-Za-z0-9][A-Za-z0-9.-]{0,252})"
    r"(?::([0-9]{1,5}))?/\./([A-Za-z0-9_][A-Za-z0-9_./-]{0,200})\Z"
)



def parse_repository_url(url, field="repository"):
    """Split ssh://USER@HOST[:PORT]/./PATH; a bad URL names the pillar field."""
    m = REPOSITORY_URL_RE.match(str(url))
    require(m and HOSTNAME_RE.match(m.group(2)) and ".." not in m.group(4).split("/")
            and (m.group(3) is None or 0 < int(m.group(3)) < 65536), field,
            f"{url!r} is not a repository URL like ssh://abcd1234@abcd1234.repo.borgbase.com/./repo")
    return {"user": m.group(1), "host": m.group(2),
            "port": int(m.group(3)) if m.group(3) else None, "path": m.group(4).rstrip("/")}



def vm_server(settings, vm):
    """The server as this VM reaches it: the shared server, or the VM's own
    repository account when qborg:vms:<vm>:repository is set."""
    server = dict(settings["server"])
    url = settings["vms"][vm].get("repository")
    if url:
        parsed = parse_repository_url(url, repository_field(settings, vm))
        server.update(user=parsed["user"], host=parsed["host"],
                      port=parsed["port"] or server["port"], repository_path=parsed["path"])
    return server
