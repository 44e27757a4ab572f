"""`gpufleet run [options] -- CMD ARGS... ::: A B ::: C D :::: FILE`: GNU parallel's interface on the
GPU dispatcher. Inputs from ``:::`` lists, ``::::`` files (one value per line, ``-`` for stdin) and,
with ``--glob``, glob patterns; their cartesian product gives the tasks. Placeholders: ``{}``,
``{1}``, ``{2}``, ``{/}``, ``{.}``, ``{/.}``, ``{//}``, ``{#}`` and ``{output}`` (the temporary name of
``--output``). Each word of CMD stays one argument (no shell unless ``--shell``), so file names with
spaces, quotes, ``;``, ``$()`` or newlines pass through untouched."""
from __future__ import annotations

import argparse
import glob
import itertools
import shlex
import sys

from .. import _dispatch


def register(sub) -> None:
    p = sub.add_parser("run", help="run a command for every input on the GPUs (GNU parallel style)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="auto", help="'auto' (every visible GPU), or a list such as '0,2'")
    p.add_argument("--slots", type=int, default=1, help="tasks at a time per GPU (default 1)")
    p.add_argument("--gpus", type=int, default=1, help="GPUs per task (0: CPU-only tasks; default 1)")
    p.add_argument("--cpu-slots", type=int, default=None, help="tasks at a time for --gpus 0")
    p.add_argument("--min-free-memory", default=None, help="start a task only when its GPU has this free ('20GiB')")
    p.add_argument("--retries", type=int, default=0, help="extra attempts after a failure, preferably elsewhere")
    p.add_argument("--timeout", type=float, default=None, help="seconds before a task's process group is stopped")
    p.add_argument("--kill-grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.add_argument("--output", default=None, help="output path template ('out/{1/.}.mp4'); the command writes "
                   "{output}, renamed into place on success, removed on failure")
    p.add_argument("--skip-existing", action="store_true", help="skip tasks whose output exists")
    p.add_argument("--journal", default=None, help="SQLite journal of every task (for --resume)")
    p.add_argument("--resume", action="store_true", help="skip tasks the journal records as succeeded")
    p.add_argument("--log-dir", default=None, help="one log file per attempt here (default: output prefixed)")
    p.add_argument("--affinity", choices=["none", "hash"], default="none",
                   help="'hash': prefer a GPU chosen by a hash of the command (idle GPUs still steal)")
    p.add_argument("--quarantine-after", type=int, default=5, help="failures in a row that quarantine a GPU (0: never)")
    p.add_argument("--shell", action="store_true", help="run CMD with /bin/sh -c (inputs are shell-quoted)")
    p.add_argument("--glob", action="store_true", help="expand ::: values as glob patterns")
    p.add_argument("--name", default=None, help="task name template (default: the inputs)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--trace", default=None, help="write a Chrome trace (Perfetto) here")
    p.add_argument("--timeline", default=None, help="write a timeline PNG here")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no summary")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="show the progress bar")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- CMD ARGS... [::: values...] [:::: files...]")
    p.set_defaults(func=main)


def _split(words: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    template, sources = [], []
    cur = None
    for w in words:
        if w in (":::", "::::"):
            cur = (w, [])
            sources.append(cur)
        elif cur is None:
            template.append(w)
        else:
            cur[1].append(w)
    return template, sources


def _file_lines(path: str):
    f = sys.stdin if path == "-" else open(path, encoding="utf-8", errors="surrogateescape", newline="\n")
    try:
        for line in f:
            yield line[:-1] if line.endswith("\n") else line
    finally:
        if f is not sys.stdin:
            f.close()


def _rows(sources, use_glob: bool):
    lists = []
    for kind, values in sources:
        if kind == ":::":
            if use_glob:
                vals = []
                for v in values:
                    m = sorted(glob.glob(v))
                    if not m:
                        raise SystemExit(f"gpufleet run: the glob {v!r} matches no file")
                    vals += m
                values = vals
            lists.append(values)
        else:
            lists.append(itertools.chain.from_iterable(_file_lines(p) for p in values))
    if not lists:
        return iter([()])
    if len(lists) == 1:  # stream: a million-line file never sits in memory
        return ((v,) for v in lists[0])
    return itertools.product(*[list(x) for x in lists])


def main(args) -> int:
    words = list(args.command)
    if words and words[0] == "--":
        words = words[1:]
    template, sources = _split(words)
    if not template:
        print("gpufleet run: no command given: gpufleet run [options] -- CMD ARGS... ::: inputs", file=sys.stderr)
        return 2
    if args.resume and not args.journal:
        print("gpufleet run: --resume needs --journal PATH", file=sys.stderr)
        return 2
    if args.output and not any("{output}" in w for w in template):
        print("gpufleet run: --output is given but the command never uses {output} (the temporary name it must "
              "write)", file=sys.stderr)
        return 2
    options = dict(gpus=args.gpus, retries=args.retries, timeout=args.timeout, min_free_memory=args.min_free_memory,
                   affinity="hash" if args.affinity == "hash" else None)
    try:
        if args.output and all(kind == ":::" for kind, _ in sources):  # finite: refuse colliding outputs now
            _dispatch._check_template_outputs(args.output, _rows(sources, args.glob))
        tasks = _dispatch._template_tasks(template, _rows(sources, args.glob), args.output, args.name, options,
                                          shell=args.shell)
        if args.dry_run:
            for t in tasks:
                argv = [_dispatch._sub_outputs(a, t.outputs) for a in t.cmd]
                print(shlex.join(argv))
            return 0
        report = _dispatch.run(tasks, devices=args.devices, slots_per_device=args.slots, cpu_slots=args.cpu_slots,
                               journal=args.journal, resume=args.resume, skip_existing=args.skip_existing,
                               log_dir=args.log_dir, progress=args.progress, quiet=args.quiet,
                               quarantine_after=args.quarantine_after, kill_grace=args.kill_grace)
    except (ValueError, TypeError) as e:
        print(f"gpufleet run: {e}", file=sys.stderr)
        return 2
    if args.trace:
        report.to_chrome_trace(args.trace)
    if args.timeline:
        report.plot_timeline(args.timeline)
    if not args.quiet:
        print(report.summary(), file=sys.stderr)
        for what, path in (("trace", args.trace), ("timeline", args.timeline)):
            if path:
                print(f"  {what}: {path}", file=sys.stderr)
    if report.cancelled or report.drained:
        return 130
    return min(report.failed, 101)
