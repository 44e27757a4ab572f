"""The multi-GPU dispatcher for commands: ``Task``, ``run``, ``product`` and ``RunReport``.

The run loop (slots, work-conserving queue with affinity, memory-aware admission, quarantine,
timeouts and the kill sequence, retries, atomic outputs, the SQLite journal, drain and cancel) lives
in C++ (csrc/dispatch) and runs with the GIL released. This module supplies the lazy task stream
(pulled in bounded chunks), the progress display, the callbacks and the report.
"""
from __future__ import annotations

import glob as _glob
import hashlib
import itertools
import json
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, Union

from . import _core, _devices, _halt, _log as _logging, _progress
from ._dispatch_progress import _Progress
from ._dispatch_report import AttemptRecord, RunReport, TaskRecord  # noqa: F401 - AttemptRecord: importable here
from ._dispatch_template import JOB_SLOT_MARK as _JOB_SLOT_MARK
from ._dispatch_template import check_template as _check_template
from ._dispatch_template import expand as _expand, expand_command as _expand_command

__all__ = ["Task", "TaskRecord", "RunReport", "run", "product"]

_log = _logging.get("dispatch")  # Note [Logging]

PathLike = Union[str, "os.PathLike[str]"]
_RESERVED_ENV = ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER", "GPUFLEET_TASK_ID", "GPUFLEET_TASK_NAME",
                 "GPUFLEET_DEVICE", "GPUFLEET_SLOT", "GPUFLEET_ATTEMPT", "GPUFLEET_RUN_ID")


def _seconds(value, name: str) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number of seconds or None, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def _count(value, name: str, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


class Task:
    """One command to run on the GPU pool.

    ``cmd`` is an argv list (never a shell string, unless ``shell=True``: then a string run with
    ``/bin/sh -c``). In it, ``{output}`` (or ``{output0}``, ``{output1}``, ...) stands for the
    temporary name of a declared output; the file is renamed to its final name when the command
    succeeds and removed when it fails. ``gpus=0`` is a CPU-only task (it sees no GPU);
    ``min_free_memory`` (bytes or "4GiB") delays the start until a device has that much free;
    ``affinity`` (a pool position, or ``"hash"`` for the seed's stable hash of the command) is a
    preference: an idle device still steals the task.
    """

    __slots__ = ("cmd", "env", "cwd", "outputs", "gpus", "min_free_memory", "timeout", "retries", "name",
                 "shell", "affinity", "_key_argv")

    def __init__(self, cmd: Union[Sequence[str], str], *, env: Optional[dict] = None, cwd: Optional[PathLike] = None,
                 outputs: Sequence[PathLike] = (), gpus: int = 1, min_free_memory: Union[int, str, None] = None,
                 timeout: Optional[float] = None, retries: int = 0, name: Optional[str] = None, shell: bool = False,
                 affinity: Union[int, str, None] = None):
        if shell:
            if not isinstance(cmd, str):
                raise TypeError(f"with shell=True, cmd must be one string for /bin/sh -c, got {cmd!r}")
            argv = ["/bin/sh", "-c", cmd]
        else:
            if isinstance(cmd, (str, bytes)):
                raise TypeError(f"cmd must be a list of arguments, got the string {cmd!r}; pass shell=True to run it "
                                "with /bin/sh -c")
            argv = [os.fspath(a) if isinstance(a, os.PathLike) else a for a in cmd]
            bad = [a for a in argv if not isinstance(a, str)]
            if bad:
                raise TypeError(f"every argument of cmd must be a string or a path, got {bad[0]!r} in {cmd!r}")
            if not argv:
                raise ValueError("cmd must not be empty")
        for a in argv:  # a C string ends at NUL: the command would silently get a shorter argument
            # the marks of {output} and of {%} (filled in at launch) are ours, not the user's NUL bytes
            if "\0" in (str.replace(a, _MARK, "") if isinstance(a, _OutputSlot) else a).replace(_JOB_SLOT_MARK, ""):
                raise ValueError(f"an argument of cmd contains a NUL byte, which no command can receive: {a!r}")
        self.cmd = argv
        self.env = {}
        for k, v in (env or {}).items():
            if not isinstance(k, str) or not isinstance(v, str) or not k or "=" in k or "\0" in k + v:
                raise ValueError(f"env must map variable names (no '=', no NUL) to strings (no NUL), got {k!r}: {v!r}")
            if k in _RESERVED_ENV:
                raise ValueError(f"env may not set {k}: the dispatcher sets it for each task")
            self.env[k] = v
        self.cwd = None if cwd is None else os.fspath(cwd)
        if isinstance(outputs, (str, os.PathLike)):
            outputs = [outputs]
        for p in [self.cwd or ""] + [os.fspath(o) for o in outputs]:
            if "\0" in p:
                raise ValueError(f"a path contains a NUL byte, which no file name can: {p!r}")
        self.outputs = [os.path.abspath(os.path.join(self.cwd or "", os.fspath(o))) for o in outputs]
        for o in self.outputs:
            size = len(os.fsencode(os.path.basename(o)))
            if size > _NAME_MAX:
                raise ValueError(f"output {o!r}: its name is {size} bytes long, at most {_NAME_MAX} bytes are allowed "
                                 "in a file name on Linux")
        self.gpus = _count(gpus, "gpus")
        self.min_free_memory = 0 if min_free_memory is None else _devices.parse_memory_size(
            min_free_memory, name="min_free_memory")
        self.timeout = _seconds(timeout, "timeout")
        self.retries = _count(retries, "retries")
        if affinity is not None and affinity != "hash" and (isinstance(affinity, bool) or not isinstance(affinity, int)
                                                            or affinity < 0):
            raise ValueError(f"affinity must be None, a pool position (int >= 0) or 'hash', got {affinity!r}")
        self.affinity = affinity
        self.shell = shell
        self.name = name if name is not None else " ".join(argv if not shell else [cmd])[:80]
        self._key_argv = None

    def __repr__(self) -> str:
        return f"Task({self.cmd!r}, gpus={self.gpus}, outputs={self.outputs!r})"

    def _key(self) -> str:
        argv = self._key_argv if self._key_argv is not None else [_sub_outputs(a, self.outputs) for a in self.cmd]
        blob = json.dumps([argv, self.cwd, self.outputs, sorted(self.env.items()), self.gpus], ensure_ascii=False)
        return hashlib.sha1(blob.encode("utf-8", "surrogateescape")).hexdigest()

    def _spec(self, seq: int, token: str, pool_size: int, keyed: bool = True):
        return _core.TaskSpec(*self._spec_args(seq, token, pool_size, keyed))

    def _spec_args(self, seq: int, token: str, pool_size: int, keyed: bool = True) -> tuple:
        """``_core.TaskSpec``'s arguments (picklable: a cluster run sends them to a node)."""
        # The key (a hash of the command) only serves the journal; without one it is left empty, which
        # takes a third of this per-task cost off the run loop's thread.
        temps = [_temp_name(o, token) for o in self.outputs]
        argv = [_sub_outputs(a, temps) for a in self.cmd]
        affinity = -1
        if self.affinity == "hash":
            if pool_size:
                affinity = int(hashlib.md5("\0".join(self.cmd).encode("utf-8", "surrogateescape")).hexdigest(), 16) % pool_size
        elif self.affinity is not None:
            affinity = self.affinity if self.affinity < pool_size else -1
        # Bytes (os.fsencode) for everything that names a file or reaches the command: a file name that
        # is not UTF-8 (legal on Linux) travels as the bytes it is.
        fs = os.fsencode
        return (seq, self._key() if keyed else "", fs(self.name), [fs(a) for a in argv],
                [(fs(k), fs(v)) for k, v in self.env.items()], fs(self.cwd or ""),
                [(fs(o), fs(t)) for o, t in zip(self.outputs, temps)], self.gpus, self.min_free_memory, self.timeout,
                self.retries, affinity)


_NAME_MAX = 255  # bytes in one file name (Linux file systems)


def _temp_name(final: str, token: str) -> str:
    # Deterministic (no run token): a run that resumes after a crash reuses, and so removes, the
    # partial file a killed attempt left behind. The extension is kept for programs that pick the
    # format from it (ffmpeg). A name near the 255-byte limit cannot take the 8 added bytes: its stem
    # is shortened and a hash of the whole name keeps it unique.
    d, base = os.path.split(final)
    stem, ext = os.path.splitext(base)
    temp = f".{stem}.gfpart{ext}"
    if len(os.fsencode(temp)) <= _NAME_MAX:
        return os.path.join(d, temp)
    raw_stem, raw_ext = os.fsencode(stem), os.fsencode(ext)
    if len(raw_ext) > 32:
        raw_stem, raw_ext = raw_stem + raw_ext, b""
    tag = b"~" + hashlib.sha1(os.fsencode(base)).hexdigest()[:12].encode() + b".gfpart" + raw_ext
    return os.path.join(d, os.fsdecode(b"." + raw_stem[:_NAME_MAX - 1 - len(tag)] + tag))


# ---- building tasks --------------------------------------------------------------------------

def _input_values(source) -> list:
    if isinstance(source, str):
        matches = sorted(_glob.glob(source))
        if not matches:
            raise ValueError(f"the glob {source!r} matches no file (pass a list to use literal values)")
        return matches
    if isinstance(source, os.PathLike):
        return [os.fspath(source)]
    return [os.fspath(v) if isinstance(v, os.PathLike) else str(v) for v in source]


def product(cmd: Sequence[str], *inputs, output: Optional[str] = None, name: Optional[str] = None,
            **task_options) -> Iterator[Task]:
    """The tasks of ``cmd`` for every combination of ``inputs`` (lists, or glob strings), lazily.

    ``cmd`` uses GNU parallel's placeholders: ``{1}``, ``{2}`` (the inputs), ``{}``, ``{/}``, ``{.}``,
    ``{/.}``, ``{//}``, ``{#}`` and ``{output}`` (the temporary name of ``output``, itself a template
    such as ``"out/{1/.}_{2/.}.mp4"``). Seed 000 in one call::

        gpufleet.product(["python", "swap.py", "--vid", "{1}", "--img", "{2}", "--output", "{output}"],
                         "videos/*.mp4", "images/*.jpg", output="out/{1/.}_{2/.}.mp4")
    """
    if isinstance(cmd, str):
        raise TypeError("cmd must be a list of arguments (templates), not one string")
    lists = [_input_values(s) for s in inputs]
    if output is not None:
        _check_template_outputs(output, itertools.product(*lists))
    return _template_tasks(list(cmd), itertools.product(*lists), output, name, task_options)


def _check_output_collisions(items: Iterable[tuple]) -> None:
    """Raises ValueError naming the first two tasks that declare the same output file. ``items``:
    ``(task number (1-based), description, [output paths])``. Paths compare as normalised absolute
    paths (no file system access: millions of them stay cheap); other spellings of one file (a
    symlinked directory) are caught when the tasks are pulled, by Note [Output collisions] in
    csrc/dispatch/admission.cpp."""
    owner: dict = {}
    for number, what, paths in items:
        for p in paths:
            key = os.path.normpath(os.path.abspath(p))
            first = owner.setdefault(key, (number, what))
            if first[0] != number:
                raise ValueError(f"task {first[0]} ({first[1]}) and task {number} ({what}) would both write "
                                 f"{p!r}: make the output name unique per task (e.g. with {{#}}, or {{//}} for the "
                                 "input's directory); nothing was run")


def _check_template_outputs(output: str, rows: Iterable[Sequence[str]]) -> None:
    """The collision check for an output template over finite inputs (product(), and the CLI's
    ``:::`` lists), before any task exists."""
    _check_output_collisions((i + 1, "inputs " + " ".join(map(repr, row)),
                              [os.path.abspath(_expand(output, row, i + 1, None))]) for i, row in enumerate(rows))


_MARK = "\0gfout\0"  # stands for the output in expanded templates; NUL never occurs in argv or file names


class _OutputSlot(str):
    """An argv word whose output placeholder is already expanded to ``_MARK``, so that input text
    containing "{output}" (a hostile file name) is never expanded a second time."""

    quote = False


def _slot(arg: str, quote: bool) -> str:
    # Every word of a template task is already expanded: wrapping it keeps _sub_outputs from
    # expanding "{output}" that came from an input (a file named "{output}.txt").
    s = _OutputSlot(arg)
    s.quote = quote
    return s


def _template_tasks(template: list, rows: Iterable[Sequence[str]], output: Optional[str], name: Optional[str],
                    options: dict, shell: bool = False, missing_ok: bool = False) -> Iterator[Task]:
    # Note [Placeholders as GNU parallel] in _dispatch_template.py
    _check_template(list(template) + [w for w in (output, name) if w])
    if output is not None and "{%}" in output:
        raise ValueError(f"the output template {output!r} uses {{%}}, the job slot, which is only known when the task "
                         "starts; use {#} (the task number) to name outputs")
    for i, row in enumerate(rows):
        seq1 = i + 1
        out = None if output is None else _expand(output, row, seq1, None)
        cmd = _expand_command(template, row, seq1, _MARK if out is not None else None, shell=shell,
                              missing_ok=missing_ok)
        argv = [cmd] if shell else cmd
        key_argv = [a.replace(_MARK, out) for a in argv] if out is not None else argv
        label = _expand(name, row, seq1, out) if name else (" ".join(row) if row else " ".join(key_argv))[:80]
        label = label.replace(_JOB_SLOT_MARK, "{%}")
        if shell:
            t = Task(_slot(cmd, True), shell=True, outputs=[out] if out else [], name=label, **options)
        else:
            t = Task([_slot(a, False) for a in argv], outputs=[out] if out else [], name=label, **options)
        t._key_argv = key_argv
        yield t


def _sub_outputs(arg: str, paths: Sequence[str]) -> str:
    if isinstance(arg, _OutputSlot):
        if _MARK not in arg:
            return str(arg)
        if not paths:
            raise ValueError("the command uses {output} but the task declares no output")
        import shlex

        return str.replace(arg, _MARK, shlex.quote(paths[0]) if arg.quote else paths[0])
    if "{output" not in arg:
        return arg
    import re

    def sub(m):
        i = int(m.group(1) or 0)
        if i >= len(paths):
            raise ValueError(f"{m.group(0)} in the command refers to output {i}, but the task declares "
                             f"{len(paths)} output{'s' if len(paths) != 1 else ''}")
        return paths[i]

    return re.sub(r"\{output(\d*)\}", sub, arg)


# ---- run ---------------------------------------------------------------------------------------

def _resolve_devices(devices) -> list[int]:
    if devices is None or devices == "auto":
        return list(range(_devices.device_count()))
    if isinstance(devices, str):
        if devices.strip() in ("", "none", "cpu"):
            return []
        devices = [d.strip() for d in devices.split(",") if d.strip()]
        devices = [int(d) if d.isdigit() else d for d in devices]
    if isinstance(devices, int) and not isinstance(devices, bool):
        raise TypeError(f"devices must be 'auto', a list of devices or a string like '0,2', got the int {devices}; "
                        f"for one device write [{devices}]")
    out = []
    for d in devices:
        dev = _devices.as_device(d)
        if dev.type != "cuda" or dev.index is None:
            raise ValueError(f"devices takes CUDA devices with an index (2, 'cuda:2'), got {d!r}")
        out.append(dev.index)
    return out


class _Options:
    """``run()``'s arguments, checked once; what a local and a cluster run share (cluster/_driver.py)."""

    def __init__(self, tasks, *, slots_per_device, cpu_slots, journal, resume, skip_existing, log_dir, output,
                 progress, quiet, total, on_start, on_finish, quarantine_after, kill_grace, retry_backoff,
                 memory_poll, max_records, check, halt):
        self.slots_per_device = _count(slots_per_device, "slots_per_device", 1)
        if cpu_slots is not None:
            _count(cpu_slots, "cpu_slots", 1)
        self.cpu_slots = cpu_slots
        if resume and journal is None:
            raise ValueError("resume=True needs a journal (journal='run.sqlite')")
        if output is None:
            output = "files" if log_dir is not None else "prefix"
        if output not in ("files", "prefix", "inherit", "null"):
            raise ValueError(f"output must be 'files', 'prefix', 'inherit' or 'null', got {output!r}")
        if output == "files" and log_dir is None:
            raise ValueError("output='files' needs log_dir")
        if total is None and hasattr(tasks, "__len__"):
            total = len(tasks)
        self.stopper = _halt.Halt.parse(halt)
        if self.stopper is not None and self.stopper.pct is not None and total is None:
            raise ValueError(f"halt={halt!r} is a percentage of the tasks, so it needs their number: pass total= (or a "
                             "list of tasks)")
        if isinstance(tasks, (list, tuple)):  # finite and already built: refuse colliding outputs up front
            _check_output_collisions((i + 1, repr(t.name), t.outputs) for i, t in enumerate(tasks)
                                     if isinstance(t, Task))
        if progress is None:
            progress = not quiet and _progress.mode() != "plain"
        self.journal, self.resume, self.skip_existing, self.log_dir = journal, resume, skip_existing, log_dir
        self.output, self.progress, self.quiet, self.total = output, progress, quiet, total
        self.on_start, self.on_finish, self.quarantine_after = on_start, on_finish, quarantine_after
        self.kill_grace, self.retry_backoff, self.memory_poll = kill_grace, retry_backoff, memory_poll
        self.max_records, self.check = max_records, check
        # a halt condition is checked before the next task starts: every event at once (_halt.py)
        self.event_interval = 0.0 if self.stopper is not None else 0.1 if (progress or on_start or on_finish) else 0.25

    def new_report(self, pool: list) -> RunReport:
        report = RunReport(pool, self.slots_per_device, self.max_records)
        report.journal = None if self.journal is None else os.path.abspath(os.fspath(self.journal))
        return report

    def finish_report(self, report: RunReport, totals: dict) -> RunReport:
        """The end of a run (local or cluster), after the progress display closed."""
        if self.stopper is not None and report.halt_exit_status is None:
            report.halt_exit_status = self.stopper.final_exit_status()
        report.run_id = totals["run_id"]
        report.drained = totals["drained"]
        report.cancelled = totals["cancelled"]
        if report.attempts:
            report.started = min(report.started, min(a.start for a in report.attempts))
        report.tasks.sort(key=lambda t: t.seq)  # input order, as Executor.map and ray.get give results
        if self.check and not report.ok:
            raise RuntimeError(report.summary())
        return report


def _as_task(t) -> Task:
    if isinstance(t, Task):
        return t
    if isinstance(t, (list, tuple)):
        return Task(list(t))
    raise TypeError(f"tasks must yield gpufleet.Task objects or argv lists, got {t!r}")


class _Events:
    """What a run does with its events, local or cluster: the report, the progress display, the halt
    condition and the callbacks. ``control`` is what a halt stops (``drain()``, ``cancel()``);
    ``names(ev)`` gives an event's device names."""

    def __init__(self, o: _Options, report: RunReport, bar, control, names: Callable[[Any], list]):
        self.o, self.report, self.bar, self.control, self.names = o, report, bar, control, names
        self.running: dict = {}   # seq -> (name, devices), for the progress display
        self.attempts: dict = {}  # seq -> its latest attempt number

    def record(self, ev, attempts: int) -> TaskRecord:
        started = ev.kind in ("finished",) and ev.pid != 0
        return TaskRecord(ev.seq, ev.name, ev.status, self.names(ev), ev.slot if ev.kind == "finished" else None,
                          ev.start if started else None, ev.end if started else None, attempts, ev.exit_code,
                          ev.signal, ev.log_path or None, ev.message, getattr(ev, "node", None))

    def __call__(self, events) -> None:
        o, report = self.o, self.report
        for ev in events:
            kind = ev.kind
            if kind == "started":
                self.running[ev.seq] = (ev.name, self.names(ev))
                self.attempts[ev.seq] = ev.attempt
                if o.on_start is not None:
                    o.on_start(TaskRecord(ev.seq, ev.name, "running", self.names(ev), ev.slot, ev.start, None,
                                          ev.attempt, None, None, ev.log_path or None, "", getattr(ev, "node", None)))
            elif kind == "message":
                self.message(ev.message)
            else:
                if kind == "finished":
                    self.running.pop(ev.seq, None)
                    if ev.pid != 0 or ev.attempt:
                        report._attempt(ev, self.names(ev))
                if kind == "finished" and not ev.final:
                    continue
                rec = self.record(ev, self.attempts.pop(ev.seq, 0))
                report._final(rec)
                if rec.status in ("failed", "timed_out") and self.bar is None and not o.quiet:
                    _log.warning("task #%d %r %s: %s", rec.number, rec.name, rec.status, rec.message)
                stopper = o.stopper
                if stopper is not None and report.halted is None:
                    when = stopper.update(rec, o.total)
                    if when is not None:
                        report.halted = stopper.describe(rec)
                        report.halt_exit_status = stopper.exit_status
                        (self.control.cancel if when == "now" else self.control.drain)()
                if o.on_finish is not None:
                    o.on_finish(rec)
        if self.bar is not None:
            self.bar.update(report.counts, self.running)

    def message(self, text: str) -> None:
        self.report.messages.append(text)
        if self.bar is not None:
            self.bar.write(f"gpufleet: {text}")
        else:
            _log.warning("%s", text)


class _Interrupts:
    """Ctrl-C during a run goes to ``handler`` (the drain/cancel policy), never raises inside a
    callback (no half-recorded event); ``wake_fd`` is readable when a signal arrived (-1 outside
    the main thread, where Python delivers no signals)."""

    def __init__(self, handler: Callable[[], Any]):
        self.handler = handler
        self.wake_fd = self._wake_w = -1
        self._old_wakeup = self._old_sigint = None

    def __enter__(self) -> "_Interrupts":
        if threading.current_thread() is threading.main_thread():
            self.wake_fd, self._wake_w = os.pipe()
            os.set_blocking(self._wake_w, False)
            os.set_blocking(self.wake_fd, False)
            self._old_wakeup = signal.set_wakeup_fd(self._wake_w, warn_on_full_buffer=False)
        if self.wake_fd >= 0 and signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._old_sigint = signal.signal(signal.SIGINT, lambda signum, frame: self.handler())
        return self

    def __exit__(self, *exc) -> None:
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
        if self._old_sigint is not None:
            signal.signal(signal.SIGINT, self._old_sigint)
        for fd in (self.wake_fd, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self.wake_fd = self._wake_w = -1


def run(tasks: Iterable[Union[Task, Sequence[str]]], devices: Any = "auto", slots_per_device: int = 1, *,
        cpu_slots: Optional[int] = None, journal: Optional[PathLike] = None, resume: bool = False,
        skip_existing: bool = False, log_dir: Optional[PathLike] = None, output: Optional[str] = None,
        progress: Optional[bool] = None, quiet: bool = False, total: Optional[int] = None,
        on_start: Optional[Callable[[TaskRecord], Any]] = None,
        on_finish: Optional[Callable[[TaskRecord], Any]] = None,
        quarantine_after: int = 5, kill_grace: float = 5.0, retry_backoff: float = 0.5,
        memory_poll: float = 0.5, max_records: int = 100_000, check: bool = False,
        halt: Optional[str] = None, cluster: Optional[str] = None) -> RunReport:
    """Runs every task on the device pool and returns a ``RunReport``.

    ``tasks`` is any iterable of ``Task`` (or argv lists), consumed lazily in bounded chunks.
    ``devices``: ``"auto"`` (every visible GPU), a list (``[0, 2]``, ``["cuda:1"]``) or ``"0,2"``.
    ``journal``: an SQLite file recording every task; with ``resume=True`` tasks recorded as
    succeeded whose outputs still exist are skipped. ``skip_existing`` skips tasks whose declared
    outputs all exist (safe: outputs are atomic). Output of tasks goes to ``log_dir`` (one file per
    attempt, ``<log_dir>/<run_id>/task-<n>.attempt-<k>.log`` with ``n`` the task's number) or, without one, to this process's stdout with a ``[name]`` prefix (``output="inherit"``
    or ``"null"`` also work). ``progress`` defaults to on when stderr is a terminal (or in a
    notebook) and not ``quiet``; ``total`` (the number of tasks, taken from ``len(tasks)`` when
    there is one) gives the bar its percentage and ETA. The first Ctrl-C drains (running tasks
    finish, nothing new starts), the second cancels them. ``halt`` is GNU parallel's ``--halt``
    (``"now,fail=1"``, ``"soon,fail=10%"``, ``"now,success=1"``, ``"soon,done=3"``): ``soon`` drains,
    ``now`` cancels (``report.halted``, ``report.halt_exit_status``). ``check=True`` raises
    ``RuntimeError`` with the summary when a task failed.

    ``cluster``: run on every GPU of a Ray cluster instead of this machine's (``"auto"``, an address
    such as ``"ray://head:10001"`` or ``"10.0.0.1:6379"``; needs the ``ray`` extra). The tasks, the
    journal and the report stay here; each node runs its share with the same dispatcher (Note
    [Cluster runs] in gpufleet/cluster/__init__.py); ``devices`` must be ``"auto"`` there.
    """
    o = _Options(tasks, slots_per_device=slots_per_device, cpu_slots=cpu_slots, journal=journal, resume=resume,
                 skip_existing=skip_existing, log_dir=log_dir, output=output, progress=progress, quiet=quiet,
                 total=total, on_start=on_start, on_finish=on_finish, quarantine_after=quarantine_after,
                 kill_grace=kill_grace, retry_backoff=retry_backoff, memory_poll=memory_poll,
                 max_records=max_records, check=check, halt=halt)
    if cluster is not None:
        if devices not in ("auto", None):
            raise ValueError(f"devices={devices!r} names GPUs of this machine; a cluster run uses every GPU of the "
                             "cluster's nodes (leave devices='auto')")
        from .cluster import _driver  # Note [Optional extras]: ray is checked there, before any work

        return _driver.run(tasks, o, cluster)
    return _run_local(tasks, o, _resolve_devices(devices))


def _run_local(tasks, o: _Options, ordinals: list) -> RunReport:
    token = _core.random_token()[:12]
    pool = _core.make_pool(ordinals)
    report = o.new_report(pool)
    it = iter(tasks)
    keyed = o.journal is not None
    seq = itertools.count()
    bar = _Progress(pool, o.slots_per_device, o.total) if o.progress else None
    holder: dict = {}
    pool_names = [f"cuda:{d.ordinal}" for d in pool]
    handle = _Events(o, report, bar, _Later(holder), lambda ev: [pool_names[i] for i in ev.devices])

    def pull(n: int):
        try:
            return [_as_task(t)._spec(next(seq), token, len(pool), keyed) for t in itertools.islice(it, n)]
        except KeyboardInterrupt:  # Ctrl-C while Python code ran: same policy as in the C++ loop
            holder["d"].interrupt()
            return []

    def on_events(events) -> None:
        try:
            handle(events)
        except KeyboardInterrupt:
            holder["d"].interrupt()

    def interrupt() -> None:
        if "d" in holder:
            holder["d"].interrupt()
        else:
            signal.default_int_handler(signal.SIGINT, None)

    try:
        with _Interrupts(interrupt) as intr:
            d = _core.Dispatcher(
                ordinals, o.slots_per_device, o.cpu_slots or 0, o.quarantine_after, float(o.kill_grace),
                float(o.retry_backoff), o.output, b"" if o.log_dir is None else os.fsencode(o.log_dir),
                b"" if o.journal is None else os.fsencode(o.journal), bool(o.resume), bool(o.skip_existing), 0,
                float(o.memory_poll), o.event_interval, os.fsencode(" ".join(sys.argv)[:1000]), pull, on_events,
                intr.wake_fd)
            holder["d"] = d
            totals = d.run()
    finally:
        holder.clear()
        report.finished = time.time()
        if bar is not None:
            bar.close()
    report.quarantined = [f"cuda:{pool[i].ordinal}" for i in totals["quarantined"]]
    return o.finish_report(report, totals)


class _Later:
    """``drain()``/``cancel()`` of the dispatcher that ``holder["d"]`` will hold."""

    def __init__(self, holder: dict):
        self.holder = holder

    def drain(self) -> None:
        self.holder["d"].drain()

    def cancel(self) -> None:
        self.holder["d"].cancel()
