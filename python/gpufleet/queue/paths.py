"""Where a queue lives, and the checks that keep it to its owner (Note [Who may use a queue]).

A private queue (one per user, like task-spooler's server) keeps its socket in the user's runtime
directory (``$XDG_RUNTIME_DIR/gpufleet``, else ``/tmp/gpufleet-<uid>``) and its database, lock and
logs in ``$XDG_STATE_HOME/gpufleet/queue`` (``~/.local/state/gpufleet/queue``), which survives a
reboot. A group queue (``--group NAME``) is run by root: socket in ``/run/gpufleet-group-NAME``,
state in ``/var/lib/gpufleet/group-NAME``. ``GPUFLEET_QUEUE_DIR`` puts both in one directory (a
second queue, or a test's own: task-spooler's ``TS_SOCKET``).
"""
from __future__ import annotations

import grp
import os
import pwd
import stat

TYPE_CHECKING = False  # typing itself costs every `gpufleet submit` 6 ms (Note [Lazy package])
if TYPE_CHECKING:
    from typing import Optional

# Note [Who may use a queue]
# ~~~~~~~~~~~~~~~~~~~~~~~~~~
# A queue runs commands as whoever owns the daemon, so whoever can talk to its socket can run code as
# that user. Three layers keep strangers out of a private queue, and a group queue's members to their
# own jobs:
# - the directory holding the socket is the owner's, mode 0700 (private) or root's with the group,
#   mode 0710 (group: members may reach the socket, not list or change anything). A directory that
#   exists with another owner or looser modes is refused, by the daemon and by every client, never
#   "fixed": in /tmp another user may have created it first to catch the jobs (and environments)
#   sent to it. The socket itself is 0600 (0660 and the group's for a group queue);
# - the daemon reads the peer's uid with SO_PEERCRED on every request and refuses anyone but the
#   owner (private) or root and the group's members (group); the client checks the daemon's uid the
#   same way (the owner, or root for a group queue) before sending anything;
# - in a group queue every job records the uid that submitted it; only that uid or root may cancel,
#   retry or read its output, and the job runs as that uid (queue/runas.py drops root's privileges
#   before the command starts, with the submitter's environment applied after the drop). A group
#   queue must therefore be started by root; a user who wants to share a queue without root would
#   let the group run code as themselves, which is refused rather than offered.

ENV_DIR = "GPUFLEET_QUEUE_DIR"
ENV_GROUP = "GPUFLEET_QUEUE_GROUP"
SOCKET_NAME = "queue.sock"
_MAX_SOCKET_PATH = 107  # sun_path holds 108 bytes with the NUL


class QueueError(RuntimeError):
    """A queue request that was refused or could not be carried out; the message says why."""


class QueuePaths:
    """``runtime``: the socket's directory; ``state``: database, lock, logs; ``group``: None for a
    private queue. (A plain class: dataclasses would add 7 ms to every `gpufleet submit`.)"""

    __slots__ = ("runtime", "state", "group")

    def __init__(self, runtime: str, state: str, group: Optional[str]):
        self.runtime, self.state, self.group = runtime, state, group

    def __eq__(self, other) -> bool:
        return isinstance(other, QueuePaths) and (self.runtime, self.state, self.group) == \
            (other.runtime, other.state, other.group)

    def __hash__(self) -> int:
        return hash((self.runtime, self.state, self.group))

    @property
    def socket(self) -> str:
        return os.path.join(self.runtime, SOCKET_NAME)

    @property
    def db(self) -> str:
        return os.path.join(self.state, "queue.sqlite")

    @property
    def journal(self) -> str:  # the dispatcher's (Note [Queue throughput] in runner.py)
        return os.path.join(self.state, "journal.sqlite")

    @property
    def lock(self) -> str:
        return os.path.join(self.state, "daemon.lock")

    @property
    def logs(self) -> str:
        return os.path.join(self.state, "logs")

    @property
    def daemon_log(self) -> str:
        return os.path.join(self.state, "daemon.log")

    def describe(self) -> str:
        return f"the group queue {self.group!r}" if self.group else "your queue"


def group_id(name: str) -> int:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        raise ValueError(f"--group {name!r}: no such group on this machine (see getent group)") from None


def locate(group: Optional[str] = None) -> QueuePaths:
    """The paths of the private queue, or of the group queue ``group`` (default: $GPUFLEET_QUEUE_GROUP)."""
    if group is None:
        group = os.environ.get(ENV_GROUP) or None
    if group is not None:
        group_id(group)
    base = os.environ.get(ENV_DIR)
    if base:
        base = os.path.abspath(base)
        paths = QueuePaths(base, base, group)
    elif group is not None:
        paths = QueuePaths(f"/run/gpufleet-group-{group}", f"/var/lib/gpufleet/group-{group}", group)
    else:
        uid = os.geteuid()
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        runtime = os.path.join(xdg, "gpufleet") if xdg and _owned_private(xdg, uid) else f"/tmp/gpufleet-{uid}"
        state_home = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
        paths = QueuePaths(runtime, os.path.join(state_home, "gpufleet", "queue"), None)
    if len(os.fsencode(paths.socket)) > _MAX_SOCKET_PATH:
        raise ValueError(f"the queue's socket path {paths.socket!r} is longer than the {_MAX_SOCKET_PATH} bytes a Unix "
                         f"socket name may have: set {ENV_DIR} to a shorter directory")
    return paths


def _owned_private(path: str, uid: int) -> bool:
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o077


def _user(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _group(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return f"gid {gid}"


def check_dir(path: str, paths: QueuePaths, owner: int) -> None:
    """Raises QueueError unless ``path`` is a real directory owned by ``owner`` with the queue's modes
    (Note [Who may use a queue]): 0700 for a private queue; the group's, no write for group or others,
    nothing for others, for a group queue."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        raise QueueError(f"{paths.describe()} has no directory {path!r} (is it running?)") from None
    mode = stat.S_IMODE(st.st_mode)
    where = f"the queue directory {path!r}"
    if not stat.S_ISDIR(st.st_mode):
        raise QueueError(f"{where} is not a directory (a symlink or a file): refusing to use it; remove it")
    if st.st_uid != owner:
        raise QueueError(f"{where} belongs to {_user(st.st_uid)}, not {_user(owner)}: refusing to use it (another "
                         "user may have created it to receive your jobs); remove it or set " + ENV_DIR)
    if paths.group is None:
        if mode & 0o077:
            raise QueueError(f"{where} has mode {mode:04o}: a private queue's directory must be 0700 (only its owner "
                             f"may reach the socket); run chmod 700 {path!r}")
        return
    gid = group_id(paths.group)
    if st.st_gid != gid or mode & 0o027:
        raise QueueError(f"{where} has group {_group(st.st_gid)} and mode {mode:04o}: a group queue's directory must "
                         f"belong to the group {paths.group!r} with no write access for the group and none for others "
                         "(0710 or 0750)")


def ensure_dir(path: str, paths: QueuePaths) -> None:
    """Creates the daemon's directory with the right owner and modes if it is missing, then checks it
    (an existing directory is never loosened or re-owned: check_dir refuses a wrong one)."""
    if not os.path.lexists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # another daemon starting at the same moment: checked below like any existing one
        else:
            if paths.group is not None:
                os.chown(path, 0, group_id(paths.group))
                os.chmod(path, 0o710)
    check_dir(path, paths, os.geteuid())


def check_client_dirs(paths: QueuePaths) -> None:
    """A client's checks before it connects: its own private directory, or root's group directory."""
    owner = os.geteuid() if paths.group is None else 0
    check_dir(paths.runtime, paths, owner)
