"""The queue daemon's settings: options of `gpufleet queue start` (and of the daemon module), kept in
the queue's database for later starts (the first submit after a stop starts it with them)."""
from __future__ import annotations

import argparse

DEFAULTS = {"devices": "auto", "slots": 1, "cpu_slots": None, "kill_grace": 5.0, "quarantine_after": 5}


def add_settings(p: argparse.ArgumentParser) -> None:
    """The daemon's settings (shared with `gpufleet queue start`); each is kept for later starts."""
    p.add_argument("--group", default=None, help="run the group queue NAME (root only; members submit to it)")
    p.add_argument("--devices", default=None, help="the GPUs of the queue: 'auto' (every visible one) or '0,2'")
    p.add_argument("--slots", type=int, default=None, help="jobs at a time per GPU (default 1)")
    p.add_argument("--cpu-slots", type=int, default=None, help="--gpus 0 jobs at a time (default: GPUs x slots)")
    p.add_argument("--kill-grace", type=float, default=None, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.add_argument("--quarantine-after", type=int, default=None,
                   help="failed jobs in a row that quarantine a GPU until the daemon restarts (0: never; default 5)")


def settings_from(args) -> dict:
    for name in ("slots", "cpu_slots"):
        v = getattr(args, name)
        if v is not None and v < 1:
            raise ValueError(f"--{name.replace('_', '-')} {v}: expected at least 1")
    if args.kill_grace is not None and args.kill_grace < 0:
        raise ValueError(f"--kill-grace {args.kill_grace}: expected seconds >= 0")
    if args.quarantine_after is not None and args.quarantine_after < 0:
        raise ValueError(f"--quarantine-after {args.quarantine_after}: expected >= 0 (0: never)")
    return {"devices": args.devices, "slots": args.slots, "cpu_slots": args.cpu_slots, "kill_grace": args.kill_grace,
            "quarantine_after": args.quarantine_after}


