"""A GPU queue that outlives the shell: ``gpufleet.submit`` and ``Job`` (``gpufleet submit``, ``ls``,
``tail``, ``cancel``, ``wait``, ``retry``, ``queue start|stop``, ``top`` on the command line).

A per-user daemon (daemon.py) runs one long-lived dispatcher (csrc/dispatch, Note [Open input]) fed
from an SQLite queue (store.py), so memory-aware admission, per-GPU slots, quarantine, the kill
sequence, the supervisor and the journal apply to queued jobs; it survives its own SIGKILL (Note
[Queue recovery] in runner.py) and serves only its owner, or a group (Note [Who may use a queue] in
paths.py). The client modules (client, protocol, paths, store) use the standard library only.
"""
from .client import Job, QueueError, submit

__all__ = ["submit", "Job", "QueueError"]
