"""What borgmatic runs besides the backup: consistency checks and monitoring
hooks, validated from pillar and rendered for the borgmatic a qube has.
"""

import re

from _qborg_base import QborgConfigError, require


def version_tuple(version):
    return tuple(int(x) for x in re.findall(r"[0-9]+", str(version))[:3]) or (0,)


# client side: consistency checks and monitoring (pillar -> borgmatic)

# every name some supported borgmatic knows; the installed borgmatic's own
# validator decides whether it knows this one (spot: 1.8.10 and later)
CHECK_NAMES = ("repository", "archives", "data", "extract", "spot", "disabled")


CHECK_FREQUENCY_RE = re.compile(
    r"^(always|[1-9][0-9]{0,5} (second|minute|hour|day|week|month|year)s?)\Z")


CHECK_OPTION_RE = re.compile(r"^[a-z][a-z0-9_]{0,40}\Z")


DEFAULT_CHECKS = ({"name": "repository", "frequency": "2 weeks"},)


MONITORING_KEYS = ("healthchecks", "ntfy", "apprise")


HTTP_URL_RE = re.compile(r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^\s]*)?\Z")


NTFY_TOPIC_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}\Z")


APPRISE_URL_RE = re.compile(r"^[a-z][a-z0-9+.-]{0,30}://[^\s]{1,2000}\Z")


APPRISE_SINCE = (1, 8, 4)


# borgmatic's own reading of a frequency (parse_frequency): a month is 30
# days, a year 365
FREQUENCY_SECONDS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400, "week": 7 * 86400,
                     "month": 30 * 86400, "year": 365 * 86400}


def frequency_seconds(frequency):
    """A check's frequency in seconds; 0 for 'always' or none (every run)."""
    if frequency is None or frequency == "always":
        return 0
    number, unit = frequency.split()
    return int(number) * FREQUENCY_SECONDS[unit.rstrip("s")]


def check_consistency_checks(value, field, at_most_every=None, provider=None):
    """The `checks` setting: borgmatic's consistency checks, run by the client
    after a backup, each no more often than its frequency. Returns a list of
    plain dicts, name first. at_most_every: the provider's rule (e.g. '1
    month'), the default frequency and the shortest one allowed there."""
    if value is None:
        if at_most_every:
            return [{"name": "repository", "frequency": at_most_every}]
        return [dict(check) for check in DEFAULT_CHECKS]
    require(isinstance(value, list) and value, field,
            "must be a non-empty list like [{name: repository, frequency: 2 weeks}] "
            "(to run none: [{name: disabled}])")
    checks = []
    for i, check in enumerate(value):
        item = f"{field}[{i}]"
        require(isinstance(check, dict), item, "must be a mapping with a name")
        require(check.get("name") in CHECK_NAMES, f"{item}:name",
                f"{check.get('name')!r} is not a check (known: {', '.join(CHECK_NAMES)})")
        out = {"name": check["name"]}
        frequency = check.get("frequency")
        if frequency is not None:
            require(isinstance(frequency, str) and CHECK_FREQUENCY_RE.match(frequency.strip()),
                    f"{item}:frequency",
                    f"{frequency!r} is not a frequency like '2 weeks', '1 month' or 'always'")
            out["frequency"] = frequency.strip()
        for key, option in check.items():
            if key in ("name", "frequency"):
                continue
            # options of newer checks (spot's tolerances): the installed
            # borgmatic's validator judges them
            require(isinstance(key, str) and CHECK_OPTION_RE.match(key)
                    and isinstance(option, (str, int, float, bool))
                    and "\n" not in str(option), f"{item}:{key}",
                    "must be a lower-case option name with a single value")
            out[key] = option
        checks.append(out)
        require(not at_most_every or out["name"] == "disabled"
                or frequency_seconds(out.get("frequency")) >= frequency_seconds(at_most_every),
                f"{item}:frequency",
                f"{provider} asks that borg check run at most every {at_most_every}, but "
                f"{out.get('frequency') or 'no frequency (after every backup)'} is more often "
                f"(borgmatic counts a month as 30 days); set frequency: '{at_most_every}' or "
                f"longer, or leave checks unset for that default")
    return checks


def check_monitoring(value, field):
    """The `monitoring` setting: where borgmatic reports each backup.

    healthchecks: a ping URL; ntfy: a topic, or {topic, server}; apprise: one
    Apprise URL or a list. Returns {} or a dict with normalised values."""
    if value is None or value == {}:
        return {}
    require(isinstance(value, dict), field,
            "must be a mapping with healthchecks, ntfy and/or apprise")
    for key in value:
        require(key in MONITORING_KEYS, f"{field}:{key}",
                f"unknown monitoring service (known: {', '.join(MONITORING_KEYS)})")
    out = {}
    url = value.get("healthchecks")
    if url is not None:
        require(isinstance(url, str) and HTTP_URL_RE.match(url), f"{field}:healthchecks",
                f"{url!r} is not an http(s) ping URL like https://hc-ping.com/UUID")
        out["healthchecks"] = url
    ntfy = value.get("ntfy")
    if ntfy is not None:
        if isinstance(ntfy, str):
            ntfy = {"topic": ntfy}
        require(isinstance(ntfy, dict), f"{field}:ntfy", "must be a topic or {topic, server}")
        for key in ntfy:
            require(key in ("topic", "server"), f"{field}:ntfy:{key}",
                    "unknown ntfy setting (known: topic, server)")
        topic = ntfy.get("topic")
        require(isinstance(topic, str) and NTFY_TOPIC_RE.match(topic), f"{field}:ntfy:topic",
                f"{topic!r} is not an ntfy topic (1 to 64 letters, digits, '_' or '-')")
        out["ntfy"] = {"topic": topic}
        server = ntfy.get("server")
        if server is not None:
            require(isinstance(server, str) and HTTP_URL_RE.match(server), f"{field}:ntfy:server",
                    f"{server!r} is not an http(s) URL like https://ntfy.sh")
            out["ntfy"]["server"] = server.rstrip("/")
    apprise = value.get("apprise")
    if apprise is not None:
        urls = [apprise] if isinstance(apprise, str) else apprise
        require(isinstance(urls, list) and urls, f"{field}:apprise",
                "must be an Apprise URL or a non-empty list of them")
        for i, url in enumerate(urls):
            require(isinstance(url, str) and APPRISE_URL_RE.match(url), f"{field}:apprise[{i}]",
                    f"{url!r} is not an Apprise URL like mailtos://user:pass@example.com")
        out["apprise"] = list(urls)
    return out


def borgmatic_monitoring_hooks(vm, monitoring, version):
    """borgmatic's own monitoring hooks for the settings' `monitoring`; the
    same keys in the 1.7 `hooks:` section and in the flat format."""
    hooks = {}
    if monitoring.get("healthchecks"):
        hooks["healthchecks"] = {"ping_url": monitoring["healthchecks"]}
    if monitoring.get("ntfy"):
        hooks["ntfy"] = dict(monitoring["ntfy"])
        hooks["ntfy"]["fail"] = {"title": f"qborg: backup of {vm} failed", "tags": "warning"}
    if monitoring.get("apprise"):
        if version_tuple(version) < APPRISE_SINCE:
            raise QborgConfigError(
                f"qborg:vms:{vm}:monitoring:apprise: borgmatic {version} in this qube has no "
                f"Apprise hook (it came with 1.8.4); use healthchecks or ntfy, or install a "
                f"newer borgmatic; fix it in the qborg pillar")
        hooks["apprise"] = {"services": [{"url": url, "label": f"qborg-{i + 1}"}
                                         for i, url in enumerate(monitoring["apprise"])]}
    return hooks
