"""The queued jobs in the daemon's memory, so that the dispatcher's pull takes the next ones without
touching the database (Note [Queue throughput]).

The database stays the record: every change here follows a committed change there, made under the
store's lock (the lock order is store, then backlog). Only the pull, on the dispatcher's thread, takes
jobs out without the store's lock: they become "handed", and the Started or Finished events record
them. A job in the backlog is queued and ready (in a heap by priority then id, one heap for CPU jobs
and one for GPU jobs) or blocked on dependencies that have not succeeded yet.
"""
from __future__ import annotations

import heapq
import threading

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Iterable, Optional

# The columns of a queued job that the dispatcher's task needs (store.JOB_ROW selects them).
ID, OWNER, NAME, ARGV, SHELL, CWD, ENV, OUTPUTS, GPUS, MFM, TIMEOUT, RETRIES, USED, ATTEMPTS, PRIORITY = range(15)


class Backlog:
    def __init__(self):
        self.lock = threading.Lock()
        self.rows: dict = {}           # id -> row, for every queued job not handed
        self.heaps: tuple = ([], [])   # ready jobs: [CPU jobs, GPU jobs] of (-priority, id); stale entries skipped
        self.blocked: dict = {}        # id -> ids of dependencies not succeeded yet
        self.dependants: dict = {}     # dependency id -> ids blocked on it
        self.handed: set = set()

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row: tuple, pending: Iterable[int] = ()) -> None:
        """A queued job (submitted, retried, or loaded at start); ``pending``: its dependencies that have
        not succeeded yet (none that failed: such a job is not queued)."""
        jid = row[ID]
        with self.lock:
            self.rows[jid] = row
            self.handed.discard(jid)
            pending = set(pending)
            if pending:
                self.blocked[jid] = pending
                for d in pending:
                    self.dependants.setdefault(d, set()).add(jid)
            else:
                heapq.heappush(self.heaps[row[GPUS] > 0], (-row[PRIORITY], jid))

    def succeeded(self, jid: int) -> bool:
        """``jid`` succeeded: the jobs blocked only on it become ready. Whether any did."""
        with self.lock:
            self.handed.discard(jid)
            ready = False
            for child in self.dependants.pop(jid, ()):
                left = self.blocked.get(child)
                if left is None:
                    continue
                left.discard(jid)
                if not left:
                    del self.blocked[child]
                    row = self.rows.get(child)
                    if row is not None:
                        heapq.heappush(self.heaps[row[GPUS] > 0], (-row[PRIORITY], child))
                        ready = True
            return ready

    def ended(self, jid: int) -> None:
        with self.lock:
            self.handed.discard(jid)

    def drop(self, ids: Iterable[int]) -> None:
        """Jobs that left the queue without running (cancelled, dependency_failed)."""
        with self.lock:
            for jid in ids:
                self.rows.pop(jid, None)
                for d in self.blocked.pop(jid, ()):
                    self.dependants.get(d, set()).discard(jid)

    def withdraw(self, jid: int) -> bool:
        """Takes a queued job out before the dispatcher gets it: False when it was handed already."""
        with self.lock:
            if jid in self.handed:
                return False
        self.drop([jid])
        return True

    def take(self, n: int, gpu_slots: int, gpu_devices: int, cpu_slots: int) -> list:
        """The ready jobs that fit the free slots, at most ``n``, highest priority first then oldest,
        marked handed. A job that does not fit now (two GPUs, one free) stays ready; those behind it
        may go (at most a few dozen are passed over per call)."""
        out: list = []
        skipped: list = []
        with self.lock:
            while len(out) < n and (gpu_slots or cpu_slots) and len(skipped) < 32:
                cpu, gpu = self.heaps
                cands = ([cpu] if cpu_slots else []) + ([gpu] if gpu_slots else [])
                cands = [h for h in cands if h]
                if not cands:
                    break
                heap = min(cands, key=lambda h: h[0])
                entry = heapq.heappop(heap)
                row = self.rows.get(entry[1])
                if row is None or entry[1] in self.blocked:  # stale: dropped, or taken and queued again
                    continue
                g = row[GPUS]
                if g == 0:
                    cpu_slots -= 1
                elif g <= min(gpu_devices, gpu_slots):
                    gpu_slots -= g
                    gpu_devices = min(gpu_devices, gpu_slots)
                else:
                    skipped.append((heap, entry))
                    continue
                del self.rows[entry[1]]
                self.handed.add(entry[1])
                out.append(row)
            for heap, entry in skipped:
                heapq.heappush(heap, entry)
        return out

    def is_handed(self, jid: int) -> bool:
        with self.lock:
            return jid in self.handed

    def pending_of(self, jid: int) -> Optional[set]:
        with self.lock:
            return self.blocked.get(jid)
