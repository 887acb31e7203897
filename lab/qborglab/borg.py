"""Which borg (and borgmatic) the lab's qubes and its server run."""

import os

from .common import SAFE_PATH_RE, LabError


class BorgMixin:
    """The lab's borg (QBORG_LAB_BORG) and a qube's own borg or borgmatic."""

    @staticmethod
    def _check_borg(program):
        """An absolute path to a borg every lab user can run, or "" (Debian's)."""
        if not program:
            return ""
        if not SAFE_PATH_RE.match(program) or len(program) > 200:
            raise LabError("QBORG_LAB_BORG %r: an absolute path of letters, digits and _.+-/"
                           % (program,))
        if not os.path.isfile(program) or os.stat(program).st_mode & 0o005 != 0o005:
            raise LabError("QBORG_LAB_BORG %s is not a borg that every user may run "
                           "(make borg-1.4 makes one)" % program)
        return program

    @property
    def remote_path(self):
        """The borg of the server's forced command (pillar server:remote_path)."""
        return self.borg or "borg"

    def use_borg(self, qube, program):
        """Put PROGRAM in the qube's prefix bin as `borg`, as a user installs a
        newer borg into /usr/local/bin: the qube's borgmatic, borgbak and
        qborg-backup (and the admin's borg runs) take it; None removes it."""
        link = os.path.join(self.prefix(qube), "bin", "borg")
        if os.path.lexists(link):
            os.unlink(link)
        if program is None:
            return None
        os.symlink(self._check_borg(program), link)
        return link

    def _install_borg(self):
        """With a lab borg, every qube runs it and the server's forced command
        (pillar remote_path) serves with it; without, Debian's everywhere."""
        for qube in self.QUBES:
            if self.USERS[qube] is None:
                continue
            link = os.path.join(self.prefix(qube), "bin", "borg")
            if self.borg:
                if not (os.path.islink(link) and os.readlink(link) == self.borg):
                    self.use_borg(qube, self.borg)
            elif os.path.islink(link):
                os.unlink(link)

    def use_borgmatic(self, qube, program):
        """Put PROGRAM (e.g. a venv's bin/borgmatic) in the qube's prefix bin as
        `borgmatic`, as a user installs a newer borgmatic into /usr/local/bin,
        which comes before /usr/bin; None removes it again."""
        link = os.path.join(self.prefix(qube), "bin", "borgmatic")
        if os.path.lexists(link):
            os.unlink(link)
        if program is None:
            return None
        if not os.access(program, os.X_OK):
            raise LabError("%s is not an executable borgmatic (make borgmatic-latest makes one)"
                           % program)
        os.symlink(program, link)
        return link
