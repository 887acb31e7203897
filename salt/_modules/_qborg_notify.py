"""The admin qube's desktop notices after maintenance: one per change of
a VM's copy (ALARM, STALE, back to normal), on the admin qube's own session
bus (org.freedesktop.Notifications, as notify-send sends it); dom0 parses
nothing and no qrexec call is made.

The state the user was told of, and any notice waiting for a desktop
session (cron gives a job no session bus: with no GUI login yet a notice
waits and is shown after a later pass), live in
~/.local/state/qborg/notices.json (0600). The D-Bus call is the standard
library's own socket, the same code as the client's qborg-notify
(tests/unit/test_alerts.py holds the copies equal).
"""

import os
import socket
import struct
import time

from _qborg_alerts import is_stale, next_told, queued
from _qborg_base import load_json, one_line, printable, save_json, human_age
from _qborg_audit import alarm_path, maint_log, record_path
from _qborg_drill import last_drill
from _qborg_servers import copy_key, copy_label
from _qborg_copies import copies

APP_NAME = "qborg"
URGENCY = {"alarm": 2, "stale": 2, "ok": 1}
BODY_MAX = 400


def notices_path(home):
    return os.path.join(home, ".local", "state", "qborg", "notices.json")


# the session bus (the same code, byte for byte, in files/client/qborg-notify)


class NoSession(Exception):
    """No desktop session bus to tell (yet): the notice waits."""


class NotShown(Exception):
    """The bus answered, but no notification server showed the notice."""


def session_bus_path(environ=None, uid=None):
    """The user's session bus socket: DBUS_SESSION_BUS_ADDRESS's unix path
    when set (a terminal of the session), else $XDG_RUNTIME_DIR/bus, else
    /run/user/UID/bus (where the session's bus lives; cron sets neither)."""
    environ = os.environ if environ is None else environ
    for part in environ.get("DBUS_SESSION_BUS_ADDRESS", "").split(";"):
        if part.startswith("unix:"):
            keys = dict(kv.split("=", 1) for kv in part[5:].split(",") if "=" in kv)
            if keys.get("path"):
                return keys["path"]
    runtime = environ.get("XDG_RUNTIME_DIR") or "/run/user/%d" % (
        os.getuid() if uid is None else uid)
    return os.path.join(runtime, "bus")


def _pad(buf, size):
    buf.extend(b"\0" * (-len(buf) % size))


def _put_string(buf, text, sig=False):
    data = text.encode("utf-8")
    if sig:
        buf.extend(struct.pack("<B", len(data)))
    else:
        _pad(buf, 4)
        buf.extend(struct.pack("<I", len(data)))
    buf.extend(data + b"\0")


def _message(serial, path, interface, member, destination, signature="", body=b""):
    """One D-Bus METHOD_CALL, little-endian."""
    buf = bytearray(struct.pack("<cBBBII", b"l", 1, 0, 1, len(body), serial))
    fields = [(1, "o", path), (2, "s", interface), (3, "s", member), (6, "s", destination)]
    if signature:
        fields.append((8, "g", signature))
    array = bytearray()
    for code, kind, value in fields:
        _pad(array, 8)
        array.extend(struct.pack("<B", code))
        _put_string(array, kind, sig=True)
        _put_string(array, value, sig=kind == "g")
    buf.extend(struct.pack("<I", len(array)))
    buf.extend(array)
    _pad(buf, 8)
    return bytes(buf) + body


def _notify_body(app_name, summary, body, urgency, timeout_ms=-1):
    """Notify's arguments, signature susssasa{sv}i."""
    buf = bytearray()
    _put_string(buf, app_name)
    _pad(buf, 4)
    buf.extend(struct.pack("<I", 0))          # replaces_id
    _put_string(buf, "")                      # app_icon
    _put_string(buf, summary)
    _put_string(buf, body)
    _pad(buf, 4)
    buf.extend(struct.pack("<I", 0))          # actions: none
    _pad(buf, 4)
    at = len(buf)
    buf.extend(struct.pack("<I", 0))          # hints: {"urgency": <byte>}
    _pad(buf, 8)
    start = len(buf)
    _put_string(buf, "urgency")
    _put_string(buf, "y", sig=True)
    buf.extend(struct.pack("<B", urgency))
    struct.pack_into("<I", buf, at, len(buf) - start)
    _pad(buf, 4)
    buf.extend(struct.pack("<i", timeout_ms))
    return bytes(buf)


def _recv_exact(sock, size):
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            raise NotShown("the session bus closed the connection")
        data += chunk
    return data


def _read_message(sock):
    """(type, reply serial, error name, body, endianness) of the next message."""
    head = _recv_exact(sock, 16)
    end = "<" if head[:1] == b"l" else ">"
    kind = head[1]
    body_len, _serial, fields_len = struct.unpack(end + "III", head[4:16])
    rest = _recv_exact(sock, fields_len + (-(16 + fields_len) % 8) + body_len)
    data = head + rest
    pos, reply, error = 16, None, None
    while pos < 16 + fields_len:
        pos += -pos % 8
        code, siglen = data[pos], data[pos + 1]
        sig = data[pos + 2:pos + 2 + siglen].decode("ascii", "replace")
        pos += 3 + siglen
        if sig in ("s", "o"):
            pos += -pos % 4
            (size,) = struct.unpack(end + "I", data[pos:pos + 4])
            value = data[pos + 4:pos + 4 + size].decode("utf-8", "replace")
            pos += 5 + size
        elif sig == "g":
            value = data[pos + 1:pos + 1 + data[pos]].decode("ascii", "replace")
            pos += 2 + data[pos]
        elif sig == "u":
            pos += -pos % 4
            (value,) = struct.unpack(end + "I", data[pos:pos + 4])
            pos += 4
        else:
            raise NotShown("unexpected header field type %r from the session bus" % sig)
        if code == 5:
            reply = value
        elif code == 4:
            error = value
    start = 16 + fields_len + (-(16 + fields_len) % 8)
    return kind, reply, error, data[start:start + body_len], end


def _call(sock, serial, message):
    """Send message (serial); the body of its reply, or NotShown with the error."""
    sock.sendall(message)
    while True:
        kind, reply, error, body, end = _read_message(sock)
        if reply != serial:
            continue  # a signal (NameAcquired) or another reply
        if kind == 3:
            text = ""
            if len(body) >= 4:
                (size,) = struct.unpack(end + "I", body[:4])
                text = body[4:4 + size].decode("utf-8", "replace")
            raise NotShown("%s: %s" % (error, text) if text else error)
        return body, end


def send_notice(summary, body, urgency=1, path=None, timeout=25):
    """Show one notice through org.freedesktop.Notifications on the user's
    session bus; its id. NoSession when there is no session bus (no GUI
    login yet), NotShown when no notification server took it."""
    path = path or session_bus_path()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, NotADirectoryError) as exc:
            raise NoSession("no desktop session bus at %s (%s)" % (path, exc.strerror)) from None
        uid = str(os.getuid()).encode("ascii").hex().encode("ascii")
        sock.sendall(b"\0AUTH EXTERNAL " + uid + b"\r\n")
        line = b""
        while not line.endswith(b"\r\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            line += chunk
        if not line.startswith(b"OK "):
            raise NotShown("the session bus refused this user: %r" % line.strip()[:80])
        sock.sendall(b"BEGIN\r\n")
        _call(sock, 1, _message(1, "/org/freedesktop/DBus", "org.freedesktop.DBus", "Hello",
                                "org.freedesktop.DBus"))
        reply, end = _call(sock, 2, _message(
            2, "/org/freedesktop/Notifications", "org.freedesktop.Notifications", "Notify",
            "org.freedesktop.Notifications", "susssasa{sv}i",
            _notify_body(APP_NAME, summary, body, urgency)))
        if len(reply) < 4:
            raise NotShown("Notify answered without an id")
        return struct.unpack(end + "I", reply[:4])[0]
    except socket.timeout:
        raise NotShown("the session bus did not answer in %ds" % timeout) from None
    except OSError as exc:
        raise NotShown("the session bus: %s" % exc) from None
    finally:
        sock.close()


# which copies are in which state after a pass


def last_archive_time(home, vm, copy, now):
    """The newest archive the audit's ledger holds for vm's copy (a time
    after now counts as now), or None."""
    ledger = load_json(record_path(home, vm, copy)) or {}
    times = [entry.get("time") for entry in (ledger.get("archives") or {}).values()
             if isinstance(entry, dict)]
    times = [min(float(t), now) for t in times if isinstance(t, (int, float))]
    return max(times) if times else None


def copy_states(settings, home, labels, now):
    """{label: (state, text)} of each copy in labels: alarm (the audit's
    alarm stands), stale (no archive, or the newest older than the VM's
    stale_after intervals) or ok; text says why, every VM-chosen string
    escaped."""
    found = {}
    for _name, view in copies(settings):
        for vm in sorted(view["vms"]):
            label = copy_label(view, vm)
            if label not in labels:
                continue
            copy = copy_key(view)
            alarm = load_json(alarm_path(home, vm, copy))
            mine = view["vms"][vm]
            last = last_archive_time(home, vm, copy, now)
            drill = last_drill(home, vm, copy)
            if alarm:
                findings = "; ".join(one_line(f) for f in alarm.get("findings") or [])
                found[label] = ("alarm", (findings or "the audit raised an alarm")
                                + "; prune and compact skipped: see qborg status")
            elif drill and drill.get("ok") is False:
                found[label] = ("alarm", one_line(f"restore drill FAILED: {drill.get('error')}"))
            elif is_stale(last, now, mine["interval_seconds"], mine["stale_after"]):
                rule = f"more than {mine['stale_after']} x {mine['interval']}"
                found[label] = ("stale", "no archive" if last is None else
                                f"last archive {human_age(now - last)} ago ({rule})")
            else:
                found[label] = ("ok", "")
    return found


# a notification daemon with body-markup (the spec's) reads <, > and & as
# markup: a name a VM chose (an archive's) must not bring a link or an
# image into the admin qube's desktop, so they never reach the body
NO_MARKUP = str.maketrans({"<": "(", ">": ")", "&": "+"})


def notice_body(why):
    return printable(why).translate(NO_MARKUP)[:BODY_MAX]


def notice_text(kind, label, why):
    if kind == "alarm":
        return f"qborg ALARM: {label}", notice_body(why)
    if kind == "stale":
        return f"No recent backup of {label}", notice_body(why)
    return f"{label} is back to normal", "Its repository passed the audit and is up to date."


def admin_notices(settings, maint, home, owner, labels, now=None, send=None):
    """After a pass over labels (copy labels): queue a notice for each copy
    whose state changed since the user was last told, then show what waits.
    Lines for the maintenance log; never raises for a missing desktop."""
    now = time.time() if now is None else now
    send = send or send_notice
    path = notices_path(home)
    record = load_json(path, {}) or {}
    told = record.get("told") if isinstance(record.get("told"), dict) else {}
    pending = [n for n in record.get("pending") or [] if isinstance(n, dict)]
    lines = []
    if maint.get("notify", "all") == "off":
        if pending:
            save_json(path, {"told": told, "pending": []}, owner)
        return lines
    changed = False
    for label, (state, why) in sorted(copy_states(settings, home, labels, now).items()):
        before = told.get(label, "ok")
        kind, after = next_told(before if before in URGENCY else "ok", state, "all", False)
        if kind:
            summary, body = notice_text(kind, label, why)
            pending = queued(pending, {"kind": kind, "summary": summary, "body": body,
                                       "urgency": URGENCY[kind], "at": int(now)})
            told[label] = after
            changed = True
    if changed:
        save_json(path, {"told": told, "pending": pending}, owner)
    while pending:
        notice = pending[0]
        try:
            sent = send(str(notice.get("summary", "")), str(notice.get("body", "")),
                        int(notice.get("urgency", 1)))
        except NoSession as exc:
            lines.append(f"notice waits for a desktop session: {notice.get('summary')} ({exc})")
            break
        except NotShown as exc:
            lines.append(f"notice not shown, retried after the next pass: "
                         f"{notice.get('summary')} ({exc})")
            break
        lines.append(f"notice {sent} shown: {notice.get('summary')}")
        pending = pending[1:]
        save_json(path, {"told": told, "pending": pending}, owner)
    for line in lines:
        maint_log(home, owner, line)
    return lines
