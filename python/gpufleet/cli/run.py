"""`gpufleet run [options] -- CMD ARGS... ::: A B ::: C D :::: FILE`: GNU parallel's interface on the
GPU dispatcher.

Inputs, as GNU parallel reads them: ::: values, :::: files (one source each, - for stdin), -a FILE;
the sources are crossed, :::+ and ::::+ pair a source with the one before it instead; stdin, one
input per line, when none is given; with no command at all, each input is a command line. --colsep
REGEX splits inputs into columns, --null reads NUL-separated input.

Placeholders, as GNU parallel's: {} {.} {/} {//} {/.} {#} {%} {n} {n.} {n/} {n//} {n/.} {-n}, and
{output} (the temporary name of --output). A command with no placeholder gets the inputs appended.
Each word of CMD stays one argument (no shell unless --shell), so file names with spaces, quotes,
';', '$()' or newlines pass through untouched.
"""
# Note [Input sources as GNU parallel] (cli/inputs.py), Note [Placeholders as GNU parallel]
# (_dispatch_template.py)
from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Optional

from .. import _dispatch, _extras
from .._dispatch_template import check_template, max_input_index
from . import inputs as _inputs
from ._run_output import JobLog, KeepOrder, command_line


def register(sub) -> None:
    p = sub.add_parser("run", help="run a command for every input on the GPUs (GNU parallel style)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="auto", help="'auto' (every visible GPU), or a list such as '0,2'")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="run on every GPU of a Ray cluster: 'auto', 'ray://head:10001' or 'head:6379' (needs "
                        "gpufleet[ray]; the journal, logs and outputs must be where every node sees them)")
    p.add_argument("--slots", type=int, default=None, help="tasks at a time per GPU (default 1)")
    p.add_argument("-j", "--jobs", default=None, metavar="N",
                   help="tasks at a time in all (GNU parallel's job slots): --gpus 0 runs N CPU tasks (N, or N%%, "
                        "+N, -N of the cores); on GPUs, N x --gpus / number of GPUs per GPU")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per task (0: CPU-only tasks; default 1)")
    p.add_argument("--cpu-slots", type=int, default=None, help="tasks at a time for --gpus 0")
    p.add_argument("--min-free-memory", default=None, help="start a task only when its GPU has this free ('20GiB')")
    p.add_argument("--retries", type=int, default=0, help="extra attempts after a failure, preferably elsewhere")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a task's process group is stopped")
    p.add_argument("--kill-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.add_argument("--halt", default=None, metavar="WHEN,WHY=N",
                   help="stop early as GNU parallel does: now|soon,fail|success|done=N|N%% (soon drains, now "
                        "cancels), or never, 0, 1, 2, -1, -2, N%%")
    p.add_argument("--output", default=None, help="output path template ('out/{1/.}.mp4'); the command writes "
                   "{output}, renamed into place on success, removed on failure")
    p.add_argument("--skip-existing", action="store_true", help="skip tasks whose output exists")
    p.add_argument("--journal", default=None, help="SQLite journal of every task (for --resume)")
    p.add_argument("--resume", action="store_true", help="skip tasks the journal records as succeeded")
    p.add_argument("--joblog", default=None, metavar="FILE",
                   help="GNU parallel's job log (tab-separated Seq Host Starttime JobRuntime Send Receive Exitval "
                        "Signal Command; '-' for stdout); the journal stays the record --resume reads")
    p.add_argument("--log-dir", default=None,
                   help="one log file per attempt, <log-dir>/<run>/task-<n>.attempt-<k>.log (default: output "
                        "prefixed with [name] on stdout)")
    p.add_argument("-k", "--keep-order", action="store_true",
                   help="print the tasks' prefixed output in input order (each task's output once it ended)")
    p.add_argument("--affinity", choices=["none", "hash"], default="none",
                   help="'hash': prefer a GPU chosen by a hash of the command (idle GPUs still steal)")
    p.add_argument("--quarantine-after", type=int, default=5, help="failures in a row that quarantine a GPU (0: never)")
    p.add_argument("--shell", action="store_true",
                   help="run each command line with /bin/sh -c (values are shell-quoted, unless the command itself "
                        "is a placeholder, as in parallel: '--shell -- {} :::: commands.txt')")
    p.add_argument("-a", "--arg-file", action="append", default=[], metavar="FILE",
                   help="an input source read from FILE, one value per line (before the ::: and :::: sources)")
    p.add_argument("--colsep", "-C", default=None, metavar="REGEX",
                   help="split each input into columns {1} {2} ... (white space around columns is trimmed)")
    p.add_argument("-0", "--null", action="store_true", help="input files and stdin are NUL-separated")
    p.add_argument("--glob", action="store_true", help="expand ::: values as glob patterns")
    p.add_argument("--name", default=None, help="task name template (default: the inputs)")
    p.add_argument("--dry-run", action="store_true",
                   help="print each command, shell-quoted, one per line, run nothing ({%%} shows as 1)")
    p.add_argument("--trace", default=None, help="write a Chrome trace (Perfetto) here")
    p.add_argument("--timeline", default=None, help="write a timeline PNG here")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show the progress bar")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS... [::: values...] [:::: files...]")
    p.set_defaults(func=main)


def _fail(msg: str) -> int:
    print(f"gpufleet run: {msg}", file=sys.stderr)
    return 2


def _jobs(value: str, gpus: int, pool: int) -> int:
    """-j as slots: CPU slots for --gpus 0, slots per GPU otherwise (ValueError names what is accepted)."""
    m = re.fullmatch(r"([+-]?)(\d+)(%?)", value.strip())
    if not m:
        raise ValueError(f"-j {value!r}: expected a number of tasks at a time (N; with --gpus 0 also N%, +N, -N of "
                         "the CPU cores)")
    sign, n, pct = m.group(1), int(m.group(2)), m.group(3)
    if gpus == 0:
        cores = os.cpu_count() or 1
        jobs = cores * n // 100 if pct else cores + n if sign == "+" else cores - n if sign == "-" else n
        if jobs < 1:
            raise ValueError(f"-j {value!r} gives {jobs} tasks at a time on {cores} cores; it must be at least 1")
        return jobs
    if pool == 0:
        raise ValueError(f"-j {value!r}: no GPU is visible for tasks that need {gpus}; --gpus 0 runs CPU tasks")
    if sign or pct:
        raise ValueError(f"-j {value!r}: relative forms count CPU cores, so they only apply with --gpus 0; give a "
                         "number of tasks at a time, or --slots per GPU")
    if n < 1 or (n * gpus) % pool:
        raise ValueError(f"-j {n} with --gpus {gpus} on {pool} GPU{'s' if pool != 1 else ''}: the tasks at a time "
                         f"must fill every GPU evenly (a multiple of {pool // _gcd(pool, gpus)}); or give --slots, the "
                         "tasks at a time per GPU")
    return n * gpus // pool


def _gcd(a: int, b: int) -> int:
    while b:
        a, b = b, a % b
    return a


def _plan(args):
    """(template, shell, Inputs) from the command words and the input options, as parallel reads them."""
    words = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    template, sources = _inputs.split_command(words)
    sources = [_inputs.Source("file", path=p) for p in args.arg_file] + sources
    shell = args.shell
    if not template:  # parallel: the inputs are the command lines
        template, shell = ["{}"], True
    if not sources:
        sources = [_inputs.Source("file", path="-")]
        if sys.stdin.isatty():
            print("gpufleet run: reading inputs from the terminal, one per line (no ::: values, :::: files or -a; end "
                  "with Ctrl-D)", file=sys.stderr)
    return template, shell, _inputs.Inputs(sources, colsep=args.colsep, null=args.null, use_glob=args.glob)


def _print_dry_run(tasks) -> None:
    for t in tasks:
        sys.stdout.buffer.write(command_line(t).encode("utf-8", "surrogateescape") + b"\n")
    sys.stdout.flush()


def main(args) -> int:
    try:
        template, shell, inp = _plan(args)
        check_template(template + [w for w in (args.output, args.name) if w])
    except ValueError as e:
        return _fail(str(e))
    if args.resume and not args.journal:
        return _fail("--resume needs --journal PATH")
    if args.output and not any("{output}" in w for w in template):
        return _fail("--output is given but the command never uses {output} (the temporary name it must write)")
    used = max_input_index(template + [w for w in (args.output, args.name) if w])
    if args.colsep is None and used > len(inp.sources):
        n = len(inp.sources)
        return _fail(f"the command uses {{{used}}} but there {'is' if n == 1 else 'are'} {n} input "
                     f"source{'s' if n != 1 else ''} (::: lists, :::: files, -a files; --colsep for columns)")
    if args.jobs is not None and args.slots is not None:
        return _fail("give -j (tasks at a time in all) or --slots (per GPU), not both")
    if args.cluster is not None and not args.dry_run:
        if args.jobs is not None:
            return _fail("-j counts this machine's slots; with --cluster give --slots (tasks at a time per GPU of "
                         "every node) or --cpu-slots (CPU tasks at a time per node)")
        if args.devices != "auto":
            return _fail(f"--devices {args.devices} names GPUs of this machine; --cluster uses every GPU of the "
                         "cluster's nodes")
        try:  # before any task runs (Note [Optional extras])
            _extras.require("ray", "ray", "gpufleet run --cluster")
        except ImportError as e:
            return _fail(str(e))
    if args.timeline and not args.dry_run:
        try:  # before any task runs (Note [Optional extras])
            _extras.require("matplotlib", "plot", "gpufleet run --timeline")
        except ImportError as e:
            return _fail(str(e))
    options = dict(gpus=args.gpus, retries=args.retries, timeout=args.timeout, min_free_memory=args.min_free_memory,
                   affinity="hash" if args.affinity == "hash" else None)
    try:
        total = inp.total()
        rows = inp.rows()
        if args.halt and "%" in args.halt and total is None:  # parallel reads all input for a percentage too
            rows = list(rows)
            total = len(rows)
        if args.output and total is not None and args.colsep is None:  # finite: refuse colliding outputs now
            rows = list(rows)
            _dispatch._check_template_outputs(args.output, rows)
        tasks = _dispatch._template_tasks(template, rows, args.output, args.name, options, shell=shell,
                                          missing_ok=args.colsep is not None)
        slots, cpu_slots = args.slots or 1, args.cpu_slots
        if args.jobs is not None:
            jobs = _jobs(args.jobs, args.gpus, 1 if args.cluster else len(_dispatch._resolve_devices(args.devices)))
            if args.gpus == 0:
                cpu_slots = jobs
            else:
                slots = jobs
        if args.dry_run:
            _print_dry_run(tasks)
            return 0
        report = _execute(args, tasks, total, slots, cpu_slots)
    except (ValueError, TypeError, ConnectionError) as e:  # ConnectionError: --cluster's address
        return _fail(str(e))
    if args.trace:
        report.to_chrome_trace(args.trace)
    if args.timeline:
        report.plot_timeline(args.timeline)
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
        for what, path in (("trace", args.trace), ("timeline", args.timeline), ("joblog", args.joblog)):
            if path and path != "-":
                print(f"  {what}: {path}", file=sys.stderr)
    if report.halt_exit_status is not None:
        return report.halt_exit_status
    if report.cancelled or report.drained:
        return 130
    return min(report.failed, 101)


def _execute(args, tasks, total: Optional[int], slots: int, cpu_slots: Optional[int]):
    pool = [] if args.cluster else [f"cuda:{o}" for o in _dispatch._resolve_devices(args.devices)]
    joblog = JobLog(args.joblog, (pool, slots)) if args.joblog else None
    keep = KeepOrder(args.log_dir) if args.keep_order else None
    if joblog is not None:
        tasks = joblog.track(tasks)

    def on_finish(rec) -> None:
        if joblog is not None:
            joblog.finished(rec)
        if keep is not None:
            keep.finished(rec)

    report = None
    try:
        report = _dispatch.run(tasks, devices=args.devices, slots_per_device=slots, cpu_slots=cpu_slots,
                               journal=args.journal, resume=args.resume, skip_existing=args.skip_existing,
                               log_dir=keep.log_dir if keep is not None else args.log_dir, total=total,
                               progress=args.progress, quiet=args.quiet, quarantine_after=args.quarantine_after,
                               kill_grace=args.kill_grace, halt=args.halt,
                               on_finish=on_finish if (joblog or keep) else None, cluster=args.cluster)
    finally:
        if joblog is not None:
            joblog.close()
        if keep is not None:
            keep.close(report)
    return report
