"""Qubes' file copy as a sender speaks it: the stream qfile-agent writes to
the qrexec service qubes.Filecopy, whose qfile-unpacker writes what comes
under ~/QubesIncoming/<sender>/ of the receiving qube; and the name rules
that unpacker holds every name and link to, so the sender leaves out what it
would refuse (a refusal ends the whole copy).

The protocol (qubes-linux-utils: qrexec-lib/libqubes-rpc-filecopy.h,
pack.c, unpack.c): per item a struct file_header (namelen, mode, filelen,
atime, atime_nsec, mtime, mtime_nsec; native byte order), the name with its
NUL (namelen counts it), then filelen bytes (a file's data, a link's target;
none for a directory); an empty header (namelen 0) ends the copy. The
receiver answers once, at the end or at its first refusal, with a struct
result_header (error_code, pad, crc32 of every byte it read) and, since
R4.1, a result_header_ext (last_namelen, the last name). The name rules:
qrexec-lib/unicode.c (validate_path, validate_utf8_char) and
unicode-allowlist-table.c, as in Qubes R4.2 (release4.2).
"""

import errno
import stat
import struct
import zlib

FILE_HEADER = struct.Struct("=IIQIIII")
RESULT_HEADER = struct.Struct("=IIQ")
RESULT_EXT = struct.Struct("=I")
MAX_PATH_LENGTH = 16384   # a name with its NUL, a link's target plus one
NAME_MAX = 255            # one part of a path, as the receiver's file system takes it
# the kernel's PATH_MAX (4096) with the NUL: the longest link target
# symlink(2) takes, and the longest name the receiver can finish, as it
# links a file in (linkat) and stats a directory sent again by its whole
# name (unpack.c); a longer one fails with ENAMETOOLONG and ends the copy
LONGEST_PATH = 4095
FILE_SIZE_MAX = (1 << 63) - 1   # LLONG_MAX: a larger filelen is EDQUOT (unpack.c)
LEGAL_EOF = 31415926      # the receiver's "the data ended early"
NO_FLAGS = 0
ALLOW_UNSAFE_CHARACTERS = 1 << 0      # QUBES_PURE_ALLOW_UNSAFE_CHARACTERS
ALLOW_NON_CANONICAL_SYMLINKS = 1 << 1
ALLOW_UNSAFE_SYMLINKS = 1 << 2
ALLOW_NON_CANONICAL_PATHS = 1 << 3
ALLOW_TRAILING_SLASH = 1 << 4
# what qfile-unpacker passes (COPY_ALLOW_NON_CANONICAL_SYMLINKS >> 2) without
# --allow-all-names: the rules a sender must meet on qubes.Filecopy
UNPACKER_FLAGS = ALLOW_NON_CANONICAL_SYMLINKS

# unicode-allowlist-table.c: the code points Qubes deems safe to display in
# a file name (hex, ranges inclusive)
_SAFE_TABLE = """
20-7e a1-a5 a7 aa-ac b1-b3 b5-b7 b9-2c1 2c6-2d1 2e0-2e4 2ec 2ee 370-374 376-377 37a-37f
386-38a 38c 38e-3a1 3a3-3e1 3f0-481 48a-52f 60c 964-965 e3f 10fb 1100-11ff 16eb-16ed
1735-1736 1802-1803 1805 1c80-1c88 1cd3 1ce9-1cec 1cee-1cf3 1cf5-1cf6 1cfa 1d00-1dbf
1e00-1f15 1f18-1f1d 1f20-1f45 1f48-1f4d 1f50-1f57 1f59 1f5b 1f5d 1f5f-1f7d 1f80-1fb4
1fb6-1fbc 1fbe 1fc2-1fc4 1fc6-1fcc 1fd0-1fd3 1fd6-1fdb 1fe0-1fec 1ff2-1ff4 1ff6-1ffc
2010-2027 2030-205e 2070-2071 2074-208e 2090-209c 20a0-20c0 2102 2107 210a-2113 2115
2118-211d 2124 2126 2128 212a-212d 212f-2139 213c-2149 214b 214e 2150-2189 2190-2194
219a-219b 21a0 21a3 21a6 21ae 21ce-21cf 21d2 21d4 21f4-22ff 2308-230b 2320-2321 2329-232a
237c 239b-23b3 23dc-23e1 2460-249b 24ea-24ff 25b7 25c1 25f8-25ff 266f 2768-2793 27c0-27ff
2900-2aff 2b30-2b44 2b47-2b4c 2c60-2c7f 2e00-2e4f 2e52-2e5d 3001-3003 3005-3011 3014-301f
3021-3029 3030-3035 3038-303d 3041-3096 309d-30ff 3105-312f 3131-318e 3192-3195 31a0-31bf
31f0-31ff 3220-3229 3248-324f 3251-325f 3280-3289 32b1-32bf 3400-4dbf 4e00-9fff a640-a66e
a673 a67e-a69d a717-a71f a722-a788 a78b-a7ca a7d0-a7d1 a7d3 a7d5-a7d9 a7f2-a7ff a830-a835
a838 a92e a960-a97c a9cf ab30-ab5a ab5c-ab69 ac00-d7a3 d7b0-d7c6 d7cb-d7fb f900-fa6d
fa70-fad9 fb00-fb06 fd3e-fd3f fe10-fe19 fe30-fe52 fe54-fe66 fe68-fe6b ff01-ff3d ff3f
ff41-ffbe ffc2-ffc7 ffca-ffcf ffd2-ffd7 ffda-ffdc ffe0-ffe2 ffe5-ffe6 ffe9-ffec
10100-10102 10107-10133 10140-10178 1018a-1018b 102e1-102fb 10780-10785 10787-107b0
107b2-107ba 16fe2-16fe3 1aff0-1aff3 1aff5-1affb 1affd-1affe 1b000-1b122 1b132 1b150-1b152
1b155 1b164-1b167 1d2c0-1d2d3 1d2e0-1d2f3 1d360-1d378 1d400-1d454 1d456-1d49c 1d49e-1d49f
1d4a2 1d4a5-1d4a6 1d4a9-1d4ac 1d4ae-1d4b9 1d4bb 1d4bd-1d4c3 1d4c5-1d505 1d507-1d50a
1d50d-1d514 1d516-1d51c 1d51e-1d539 1d53b-1d53e 1d540-1d544 1d546 1d54a-1d550 1d552-1d6a5
1d6a8-1d7cb 1d7ce-1d7ff 1df00-1df1e 1df25-1df2a 1e030-1e06d 1f100-1f10c 1fbf0-1fbf9
20000-2a6df 2a700-2b739 2b740-2b81d 2b820-2cea1 2ceb0-2ebe0 2f800-2fa1d 30000-3134a
31350-323af
"""
SAFE_RANGES = tuple(
    (int(lo, 16), int(hi or lo, 16))
    for lo, _dash, hi in (token.partition("-") for token in _SAFE_TABLE.split()))


def safe_for_display(code_point):
    """qubes_pure_code_point_safe_for_display."""
    return any(lo <= code_point <= hi for lo, hi in SAFE_RANGES)


def _byte(data, index):
    return data[index] if index < len(data) else 0  # past the end: the C string's NUL


def _utf8_char(name, i):
    """validate_utf8_char: the length of the safe character at name[i], 0 for
    invalid UTF-8, a control character or one not in the table."""
    first = name[i]
    j = i
    if 0xC2 <= first <= 0xDF:
        total, tails, code = 2, 1, first & 0x1F
    elif first == 0xE0:
        j += 1
        if not 0xA0 <= _byte(name, j) <= 0xBF:
            return 0
        total, tails, code = 3, 1, _byte(name, j) & 0x3F
    elif 0xE1 <= first <= 0xEF:
        total, tails, code = 3, 2, first & 0xF
    elif first == 0xF0:
        j += 1
        if not 0x90 <= _byte(name, j) <= 0xBF:
            return 0
        total, tails, code = 4, 2, _byte(name, j) & 0x3F
    elif 0xF1 <= first <= 0xF4:
        total, tails, code = 4, 3, first & 0x7
    else:
        return 0
    for _ in range(tails):
        j += 1
        if not 0x80 <= _byte(name, j) <= 0xBF:
            return 0
        code = code << 6 | (_byte(name, j) & 0x3F)
    return total if safe_for_display(code) else 0


def validate_path(name, allowed_leading_dotdot, flags):
    """unicode.c validate_path: the number of parts that are not '..', or
    -errno. NAME is bytes up to (not with) the NUL."""
    non_canonical = flags & ALLOW_NON_CANONICAL_PATHS
    if not name:
        return 0 if non_canonical else -errno.ENOLINK
    if name[0] == 0x2F:
        return -errno.ENOLINK  # absolute
    parts = 0
    i = 0
    while i < len(name):
        if i == 0 or name[i - 1] == 0x2F:
            char = name[i]
            if char == 0x2F:  # repeated slash
                if non_canonical:
                    i += 1
                    continue
                return -errno.EILSEQ
            if char == 0x2E:
                if _byte(name, i + 1) in (0, 0x2F):  # "."
                    if non_canonical:
                        i += 1
                        continue
                    return -errno.EILSEQ
                if _byte(name, i + 1) == 0x2E and _byte(name, i + 2) in (0, 0x2F):  # ".."
                    if allowed_leading_dotdot < 1:
                        return -errno.ENOLINK
                    allowed_leading_dotdot -= 1
                    i += 2
                    continue
            allowed_leading_dotdot = 0
            parts += 1
        if not (0x20 <= name[i] <= 0x7E or flags & ALLOW_UNSAFE_CHARACTERS):
            length = _utf8_char(name, i)
            if not length:
                return -errno.EILSEQ
            i += length - 1
        i += 1
    if not flags & ALLOW_TRAILING_SLASH and name[-1] == 0x2F:
        return -errno.EILSEQ
    return parts


def validate_file_name(name, flags=UNPACKER_FLAGS):
    """qubes_pure_validate_file_name_v2: 0 or -EILSEQ."""
    return 0 if validate_path(name, 0, flags) > 0 \
        else -errno.EILSEQ


def validate_symbolic_link(name, target, flags=UNPACKER_FLAGS):
    """qubes_pure_validate_symbolic_link_v2: 0 or -errno. A link must sit two
    parts deep at least and point no higher than its top directory."""
    depth = validate_path(name, 0, flags)
    if depth < 0:
        return -errno.EILSEQ
    if flags & ALLOW_UNSAFE_SYMLINKS:
        return 0 if depth > 0 else -errno.ENOLINK
    if flags & ALLOW_NON_CANONICAL_SYMLINKS:
        flags |= ALLOW_NON_CANONICAL_PATHS
    if depth < 2:
        return -errno.ENOLINK
    res = validate_path(target, depth - 2, flags | ALLOW_TRAILING_SLASH)
    return res if res < 0 else 0


def name_refusal(name):
    """Why qubes.Filecopy would refuse NAME (bytes) as an item's name, or None."""
    if b"\0" in name:
        return "a NUL byte in the name"
    if len(name) > LONGEST_PATH:
        return f"a name of {len(name)} bytes (Qubes' file copy takes {LONGEST_PATH})"
    if any(len(part) > NAME_MAX for part in name.split(b"/")):
        return f"a name part longer than {NAME_MAX} bytes"
    if validate_file_name(name) == 0:
        return None
    parts = name.split(b"/")
    if name.startswith(b"/"):
        return "an absolute path"
    if b".." in parts:
        return "a '..' in the path"
    if b"." in parts or b"" in parts:
        return "a path that is not canonical ('.', '//' or a trailing '/')"
    return ("a character Qubes' file copy refuses (a control character, invalid UTF-8 or "
            "a character outside its list of safe ones)")


def link_refusal(name, target):
    """Why qubes.Filecopy would refuse a link NAME -> TARGET (bytes), or None."""
    refused = name_refusal(name)
    if refused:
        return refused
    if b"\0" in target:
        return "a link target Qubes' file copy cannot carry (a NUL byte)"
    if len(target) > LONGEST_PATH:
        return f"a link target of {len(target)} bytes (a link takes {LONGEST_PATH})"
    code = validate_symbolic_link(name, target)
    if code == 0:
        return None
    if code == -errno.EILSEQ:
        return "a character in the link's target Qubes' file copy refuses"
    if target.startswith(b"/"):
        return "a link to an absolute path (Qubes' file copy keeps links inside what it copies)"
    return "a link that points outside what is restored (Qubes' file copy refuses it)"


def split_time(mtime):
    """(seconds, nanoseconds) as the header's uint32 fields take them."""
    try:
        seconds = int(mtime)
        nsec = int(round((float(mtime) - seconds) * 1e9))
    except (TypeError, ValueError, OverflowError):
        return 0, 0
    if seconds < 0 or seconds > 0xFFFFFFFF:
        return (0 if seconds < 0 else 0xFFFFFFFF), 0
    return seconds, min(max(nsec, 0), 999999999)


class QfileWriter:
    """The sending side of qubes.Filecopy over WRITE (a callable that writes
    all of its bytes or raises OSError), keeping the CRC-32 of every byte
    sent, which the receiver's answer must match."""

    def __init__(self, write):
        self._write = write
        self.crc = 0

    def send(self, data):
        self.crc = zlib.crc32(data, self.crc)
        self._write(data)

    def header(self, name, mode, size, mtime):
        raw = name + b"\0"
        seconds, nsec = split_time(mtime)
        self.send(FILE_HEADER.pack(len(raw), mode, size, seconds, nsec, seconds, nsec) + raw)

    def directory(self, name, mode, mtime):
        self.header(name, stat.S_IFDIR | (mode & 0o777), 0, mtime)

    def file_header(self, name, mode, size, mtime):
        """A regular file's header; its SIZE bytes follow through send()."""
        self.header(name, stat.S_IFREG | (mode & 0o777), size, mtime)

    def symlink(self, name, target, mtime):
        self.header(name, stat.S_IFLNK | 0o777, len(target), mtime)
        self.send(target)

    def end(self):
        self.send(FILE_HEADER.pack(0, 0, 0, 0, 0, 0, 0))


def parse_result(data):
    """The receiver's answer: (errno, crc32, last name or None); None when it
    sent none. An error code from a refused directory name comes as a
    negative errno in an unsigned field (unpack.c): it is read as its errno."""
    if len(data) < RESULT_HEADER.size:
        return None
    code, _pad, crc = RESULT_HEADER.unpack_from(data)
    if code >= 1 << 31:
        code = (1 << 32) - code
    last = None
    rest = data[RESULT_HEADER.size:]
    if len(rest) >= RESULT_EXT.size:
        (length,) = RESULT_EXT.unpack_from(rest)
        last = rest[RESULT_EXT.size:RESULT_EXT.size + min(length, MAX_PATH_LENGTH)]
    return code, crc, last


def describe_error(code, last, where):
    """What the receiver's error CODE means (qfile-agent's words), LAST the
    (printable) name it names, WHERE its incoming directory."""
    if code == errno.EEXIST:
        return (f"{where} already has \"{last}\": move the earlier restore out of "
                "QubesIncoming (or remove it), then restore again")
    if code == errno.EILSEQ:
        return f"it refused a character in a file name or link target (near \"{last}\")"
    if code == errno.ENOLINK:
        return f"it refused the link \"{last}\" (it would point outside what is restored)"
    if code == errno.EINVAL:
        return f"it found the stream corrupted at \"{last}\""
    if code in (errno.EDQUOT, errno.ENOSPC):
        return f"it ran out of space at \"{last}\": free space there (or grow its private volume)"
    if code == LEGAL_EOF:
        return f"the data ended early, at \"{last}\""
    if code == errno.EREMOTEIO:
        return "the copy ended before its end mark"
    return f"{errno.errorcode.get(code, 'error %d' % code)} at \"{last}\""
