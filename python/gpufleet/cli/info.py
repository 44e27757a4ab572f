"""`gpufleet info`: version, build facts, driver, and a device table like nvidia-smi's with the CUDA
ordinal and the physical index side by side, plus the effective CUDA_VISIBLE_DEVICES mapping, and the
processes on each GPU (pid from NVML; user and command from /proc when the pid is in this machine's
process namespace). `--watch [SECONDS]` refreshes it: in place on a terminal (like watch(1)), one
plain block per refresh otherwise, one JSON object per line with --json."""
from __future__ import annotations

import json
import os
import pwd
import sys
from typing import Optional

from .. import _devices
from . import _watch


def register(sub) -> None:
    p = sub.add_parser("info", help="show the build, the driver and the GPUs (NVML, no CUDA context)",
                       description=__doc__)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON (with --watch: one object a line)")
    p.add_argument("--watch", nargs="?", type=float, const=2.0, default=None, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until Ctrl-C")
    p.add_argument("--count", type=int, default=None, metavar="N", help="with --watch: stop after N refreshes")
    p.add_argument("--cluster", default=None, metavar="ADDRESS",
                   help="every node of a Ray cluster and its GPUs ('auto', 'ray://head:10001', 'head:6379'; needs "
                        "gpufleet[ray])")
    p.set_defaults(func=run)


def process_owner(pid: int) -> tuple[Optional[str], Optional[str]]:
    """(user, command line) of a pid from /proc; None for what cannot be known (another PID namespace,
    a process that ended, no permission)."""
    if pid <= 0:
        return None, None
    try:
        uid = os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None, None
    try:
        user = pwd.getpwuid(uid).pw_name
    except KeyError:
        user = str(uid)
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read()
        command = " ".join(a.decode("utf-8", "replace") for a in raw.rstrip(b"\0").split(b"\0")) or None
    except OSError:
        command = None
    if command is None:
        try:
            with open(f"/proc/{pid}/comm") as f:
                command = f"[{f.read().strip()}]"
        except OSError:
            pass
    return user, command


def _process_dict(p) -> dict:
    user, command = process_owner(p.pid)
    return {"pid": p.pid, "used_memory": p.used_memory, "user": user, "command": command}


def _version(v) -> str:
    return "unknown" if v is None else f"{v // 1000}.{(v % 1000) // 10}"


def _gpu_dict(g) -> dict:
    return {
        "ordinal": g.ordinal if g.ordinal >= 0 else None,
        "nvml_index": g.nvml_index if g.nvml_index >= 0 else None,
        "name": g.name or None,
        "uuid": g.uuid or None,
        "pci_bus_id": g.pci_bus_id or None,
        "mig_uuid": g.mig_uuid or None,
        "compute_capability": list(g.compute_capability) if g.compute_capability else None,
        "total_memory": g.total_memory,
        "free_memory": g.free_memory,
        "used_memory": g.used_memory,
        "utilization": g.utilization,
        "processes": None if g.processes is None else [_process_dict(p) for p in g.processes],
        "unknown_fields": list(g.unknown_fields),
        "source": g.source,
    }


def info_dict() -> dict:
    topo = _devices.topology()
    return {
        "build": _devices.build_info(),
        "driver_version": topo.driver_version or None,
        "cuda_driver_version": topo.cuda_driver_version,
        "source": topo.source,
        "cuda_visible_devices": topo.cuda_visible_devices,
        "cuda_device_order": topo.device_order,
        "ordinal_order_exact": topo.ordinal_order_exact,
        "gpus": [_gpu_dict(g) for g in topo.gpus],
        "visible": list(topo.visible),
        "notes": list(topo.notes),
    }


def _mem(v) -> str:
    return "?" if v is None else _devices.format_memory_size(v)


def render(info: dict) -> str:
    b = info["build"]
    lines = [f"gpufleet {b['version']}"]
    if b["cuda"]:
        lines.append(
            f"build:   CUDA compiled in (runtime {_version(b['cuda_runtime_version'])}, statically linked; "
            f"architectures {', '.join(b['cuda_architectures']) or 'default'})"
        )
    else:
        lines.append("build:   CUDA not compiled in (CPU-only build); NVML discovery still works")
    drv = info["driver_version"]
    lines.append(
        f"driver:  {drv or 'unknown'}"
        + (f" (supports CUDA {_version(info['cuda_driver_version'])})" if info["cuda_driver_version"] else "")
    )
    src = {"nvml": "NVML", "cuda": "CUDA runtime (NVML unavailable)", "simulated": "SIMULATED (not real GPUs)",
           "none": "none"}[info["source"]]
    lines.append(f"source:  {src}")
    cvd = info["cuda_visible_devices"]
    gpus = info["gpus"]
    if cvd is None:
        cvd_text = "unset (all GPUs visible)"
    else:
        mapping = ", ".join(f"cuda:{i}=GPU {gpus[g]['nvml_index']}" for i, g in enumerate(info["visible"]))
        cvd_text = f"{cvd!r} -> {mapping or 'no GPU visible'}"
    lines.append(f"CUDA_VISIBLE_DEVICES: {cvd_text}")
    lines.append(f"CUDA_DEVICE_ORDER:    {info['cuda_device_order']}")
    if not gpus:
        lines.append("")
        lines.append("No GPU found on this machine.")
    else:
        header = ("CUDA", "GPU", "Name", "Bus-Id", "Memory used / total", "Free", "Util", "Procs", "CC")
        rows = []
        for g in gpus:
            cc = g["compute_capability"]
            rows.append((
                f"cuda:{g['ordinal']}" if g["ordinal"] is not None else "-",
                "?" if g["nvml_index"] is None else str(g["nvml_index"]),
                g["name"] or "?",
                g["pci_bus_id"] or "?",
                f"{_mem(g['used_memory'])} / {_mem(g['total_memory'])}",
                _mem(g["free_memory"]),
                "?" if g["utilization"] is None else f"{g['utilization']}%",
                "?" if g["processes"] is None else str(len(g["processes"])),
                "?" if cc is None else f"{cc[0]}.{cc[1]}",
            ))
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines.append("")
        lines.append("  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip())
        for r in rows:
            lines.append("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        hidden = sum(1 for g in gpus if g["ordinal"] is None)
        if hidden:
            lines.append(f"({hidden} GPU{'s' if hidden != 1 else ''} hidden by CUDA_VISIBLE_DEVICES: CUDA column '-')")
        unknown = sorted({f for g in gpus for f in g["unknown_fields"]})
        if unknown:
            lines.append(f"unknown here: {', '.join(unknown)} ('?' above)")
    for note in info["notes"]:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def render_processes(info: dict) -> list[str]:
    rows = []
    for g in info["gpus"]:
        where = f"cuda:{g['ordinal']}" if g["ordinal"] is not None else f"GPU {g['nvml_index']}"
        for p in g["processes"] or []:
            rows.append((where, str(p["pid"]) if p["pid"] else "?", p["user"] or "?", _mem(p["used_memory"]),
                         (p["command"] or "?")[:100]))
    if not rows:
        return []
    header = ("GPU", "PID", "User", "Memory", "Command")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return ["", "Processes:"] + ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
                                 for r in [header, *rows]]


def _render_all(info: dict) -> str:
    return "\n".join([render(info), *render_processes(info)])


def run(args) -> int:
    if args.cluster is not None:
        return _cluster(args)
    if args.watch is None:
        info = info_dict()
        if args.json:
            json.dump(info, sys.stdout, indent=2)
            sys.stdout.write("\n")
        else:
            print(_render_all(info))
        return 0
    _watch.check(args.watch, args.count)
    return _watch.watch(info_dict, _render_all, "gpufleet info", args.watch, args.count, args.json)


def _cluster(args) -> int:
    from .._extras import require

    if args.watch is not None:
        raise ValueError("--watch refreshes this machine's table; with --cluster, run it on the node to watch")
    try:
        require("ray", "ray", "gpufleet info --cluster")
    except ImportError as e:
        print(f"gpufleet info: {e}", file=sys.stderr)
        return 2
    from ..cluster import _info

    try:
        nodes = _info.cluster_info(args.cluster)
    except ConnectionError as e:
        print(f"gpufleet info: {e}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(nodes, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(_info.render(nodes))
    return 0
