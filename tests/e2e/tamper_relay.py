#!/usr/bin/python3 -I
"""A relay that alters the stream: test_relay.py installs it as the relay
qube's qborg.SshRelay (with MODE and CONFIG filled in) to show that ssh
catches a relay that changes even one byte.

It connects to the same server the real relay would (from the relay's
configuration, by the caller's qube name) and copies bytes both ways, but
follows the cleartext start of one direction of the SSH connection (the
identification line, then binary packets up to NEWKEYS) and flips one bit:

* ``hostkey``: inside the server's key-exchange reply (message 31), in its
  host key signature, the last field;
* ``mac-from-server``: inside the server's first encrypted packet;
* ``mac-to-server``: inside the client's first encrypted packet.
"""

import json
import os
import socket
import sys
import threading

MODE = "@MODE@"
CONFIG = "@CONFIG@"
KEXDH_REPLY, NEWKEYS = 31, 21


class Flipper:
    def __init__(self, target):
        self.target = target  # "kex-reply" or "after-newkeys"
        self.buf = bytearray()
        self.pos = None  # start of the next packet, once the version line is read
        self.flip_at = None
        self.flipped = False

    def feed(self, chunk):
        if self.flipped:
            return chunk
        start = len(self.buf)
        self.buf += chunk
        if self.flip_at is None:
            self._parse()
        if self.flip_at is not None and start <= self.flip_at < len(self.buf):
            chunk = bytearray(chunk)
            chunk[self.flip_at - start] ^= 0x01
            self.flipped = True
            return bytes(chunk)
        return chunk

    def _parse(self):
        if self.pos is None:
            offset = 0
            while True:
                end = self.buf.find(b"\n", offset)
                if end < 0:
                    return
                line = bytes(self.buf[offset:end + 1])
                offset = end + 1
                if line.startswith(b"SSH-"):
                    self.pos = offset
                    break
        while self.flip_at is None and len(self.buf) >= self.pos + 6:
            length = int.from_bytes(self.buf[self.pos:self.pos + 4], "big")
            padding = self.buf[self.pos + 4]
            message = self.buf[self.pos + 5]
            if self.target == "kex-reply" and message == KEXDH_REPLY:
                payload_end = self.pos + 4 + length - padding
                self.flip_at = payload_end - 10
            elif self.target == "after-newkeys" and message == NEWKEYS:
                # past the (maybe encrypted) length field of the next packet
                self.flip_at = self.pos + 4 + length + 8
            self.pos += 4 + length


def copy(source, sink, flipper):
    try:
        while True:
            data = source()
            if not data:
                break
            sink(flipper.feed(data) if flipper else data)
    except OSError:
        pass


def main():
    caller = os.environ["QREXEC_REMOTE_DOMAIN"]
    with open(CONFIG, encoding="utf-8") as handle:
        config = json.load(handle)
    # the copy is the service argument; none: the first server's
    server = os.environ.get("QREXEC_SERVICE_ARGUMENT") or config["first"]
    route = config["routes"][caller][server]
    sock = socket.create_connection((route["host"], route["port"]))
    down = Flipper("kex-reply" if MODE == "hostkey" else "after-newkeys") \
        if MODE in ("hostkey", "mac-from-server") else None
    up = Flipper("after-newkeys") if MODE == "mac-to-server" else None

    def upstream():
        copy(lambda: os.read(0, 65536), sock.sendall, up)
        try:
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    threading.Thread(target=upstream, daemon=True).start()

    def write_out(data):
        view = memoryview(data)
        while view:
            view = view[os.write(1, view):]

    copy(lambda: sock.recv(65536), write_out, down)
    os.close(1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
