"""`gpufleet top`: a live view of the queue's GPUs (memory, utilisation, the jobs on each) and of its
jobs, refreshed in place (curses); keys act on the selected job: c cancels it, t shows its output
(followed), r queues it again. `gpufleet ls --watch` is the plain-text refresh."""
from __future__ import annotations

import sys
import time

from ..queue import client as _client
from ..queue.paths import QueueError
from . import _queue_view as view

_KEYS = "up/down select  c cancel  t output  r retry  q quit"


def register(sub) -> None:
    p = sub.add_parser("top", help="a live view of the GPUs and the queue; keys cancel, tail or retry a job",
                       description=__doc__)
    p.add_argument("--interval", type=float, default=1.0, metavar="SECONDS", help="refresh period (default 1)")
    p.add_argument("--group", default=None, metavar="NAME", help="the shared queue of group NAME")
    p.set_defaults(func=main)


def main(args) -> int:
    if not args.interval > 0:
        raise ValueError(f"--interval {args.interval}: expected a number of seconds > 0")
    if not (sys.stdin.isatty() and sys.stdout.isatty()):
        print("gpufleet top: needs a terminal (gpufleet ls --watch refreshes plain text)", file=sys.stderr)
        return 2
    try:
        _client.request("status", args.group)
    except QueueError as e:
        print(f"gpufleet top: {e}", file=sys.stderr)
        return 1
    import curses

    return curses.wrapper(lambda screen: Top(screen, args.group, args.interval).run())


def _gib(n) -> str:
    return "?" if n is None else f"{n / 2**30:.1f}"


def _bar(used, total, width: int = 10) -> str:
    if not total or used is None:
        return "[" + "?" * width + "]"
    fill = round(width * min(1.0, used / total))
    return "[" + "#" * fill + "." * (width - fill) + "]"


class Top:
    def __init__(self, screen, group, interval: float):
        import curses

        self.curses, self.screen, self.group, self.interval = curses, screen, group, interval
        self.jobs: list = []
        self.gpus: list = []
        self.queue: dict = {}
        self.selected = None      # a job id
        self.mode = "list"        # list | log | confirm
        self.note = ""
        self.log_lines: list = []
        self.next_refresh = 0.0
        curses.curs_set(0)
        screen.keypad(True)
        screen.timeout(100)

    # ---- data ----------------------------------------------------------------------------------------

    def refresh_data(self) -> None:
        try:
            r = _client.request("ls", self.group, gpus=True)
        except (QueueError, OSError) as e:
            self.note = f"queue: {e}"
            return
        self.jobs, self.gpus, self.queue = view.sort_jobs(r["jobs"]), r["gpus"], r["queue"]
        ids = [j["id"] for j in self.jobs]
        if self.selected not in ids:
            self.selected = ids[0] if ids else None
        if self.mode == "log" and self.selected is not None:
            rows = max(1, self.screen.getmaxyx()[0] - 3)
            try:
                t = _client.request("tail", self.group, id=self.selected, lines=rows)
                self.log_lines = t["data"].splitlines()[-rows:] or ["(no output yet)"]
            except (QueueError, OSError) as e:
                self.log_lines = [str(e)]

    # ---- drawing -------------------------------------------------------------------------------------

    def put(self, y: int, text: str, attr: int = 0) -> None:
        h, w = self.screen.getmaxyx()
        if 0 <= y < h:
            try:
                self.screen.addnstr(y, 0, text.ljust(w - 1), w - 1, attr)
            except self.curses.error:
                pass

    def draw(self) -> None:
        c = self.curses
        self.screen.erase()
        h, _ = self.screen.getmaxyx()
        stamp = time.strftime("%H:%M:%S")
        self.put(0, f"gpufleet top  {view.queue_line(self.queue) if self.queue else ''}  {stamp}", c.A_BOLD)
        if self.mode == "log":
            job = self._job()
            self.put(1, f"output of job {self.selected} ({job['state'] if job else '?'}): latest attempt; q or Esc: "
                        "back", c.A_REVERSE)
            for i, line in enumerate(self.log_lines[: h - 3]):
                self.put(2 + i, line)
            self.put(h - 1, self.note)
            self.screen.refresh()
            return
        y = self._draw_gpus(1)
        y = self._draw_jobs(y + 1, h - 2)
        footer = self.note or _KEYS
        if self.mode == "confirm":
            footer = f"cancel job {self.selected}? y/n"
        self.put(h - 1, footer, c.A_REVERSE if self.mode == "confirm" else 0)
        self.screen.refresh()

    def _draw_gpus(self, y: int) -> int:
        self.put(y, f"{'GPU':<8}{'NAME':<22}{'MEMORY USED':<30}{'UTIL':<6}JOBS", self.curses.A_UNDERLINE)
        running: dict = {}
        for j in self.jobs:
            if j["state"] == "running":
                for d in j["devices"]:
                    running.setdefault(d, []).append(f"#{j['id']} {j.get('user') or ''} {j['name']}".replace("  ", " "))
        for g in self.gpus:
            y += 1
            used, total = g["used_memory"], g["total_memory"]
            mem = f"{_bar(used, total)} {_gib(used)}/{_gib(total)} GiB"
            util = "-" if g["utilization"] is None else f"{g['utilization']}%"
            self.put(y, f"{g['device']:<8}{(g['name'] or '')[:21]:<22}{mem:<30}{util:<6}"
                        f"{'; '.join(running.get(g['device'], [])) or '-'}")
        if not self.gpus:
            y += 1
            self.put(y, "(no GPU in the queue's pool: CPU jobs only)")
        return y + 1

    def _draw_jobs(self, y: int, last: int) -> int:
        now = time.time()
        with_user = bool(self.queue.get("group"))
        rows = [view.header(with_user)] + [view.row(j, now, with_user) for j in self.jobs]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
        fmt = lambda cells: "  ".join(x.ljust(wd) for x, wd in zip(cells, widths)) + "  " + cells[-1]  # noqa: E731
        self.put(y, "  " + fmt(rows[0]), self.curses.A_UNDERLINE)
        room = max(1, last - y - 1)
        index = next((i for i, j in enumerate(self.jobs) if j["id"] == self.selected), 0)
        first = max(0, index - room + 1)
        for i, (cells, job) in enumerate(zip(rows[1 + first:], self.jobs[first:])):
            if i >= room:
                break
            sel = job["id"] == self.selected
            self.put(y + 1 + i, ("> " if sel else "  ") + fmt(cells), self.curses.A_REVERSE if sel else 0)
        if not self.jobs:
            self.put(y + 1, "  (no jobs: gpufleet submit -- CMD ARGS...)")
        return y + 1 + room

    def _job(self):
        return next((j for j in self.jobs if j["id"] == self.selected), None)

    # ---- keys ----------------------------------------------------------------------------------------

    def key(self, k: int) -> bool:
        """Acts on a key; False ends the program."""
        c = self.curses
        if self.mode == "confirm":
            if k in (ord("y"), ord("Y")):
                self._act("cancel")
            self.mode = "list"
            return True
        if self.mode == "log":
            if k in (ord("q"), 27, c.KEY_LEFT):
                self.mode = "list"
            return True
        if k == ord("q"):
            return False
        ids = [j["id"] for j in self.jobs]
        if ids and k in (c.KEY_UP, ord("k"), c.KEY_DOWN, ord("j")):
            i = ids.index(self.selected) if self.selected in ids else 0
            i = max(0, i - 1) if k in (c.KEY_UP, ord("k")) else min(len(ids) - 1, i + 1)
            self.selected = ids[i]
        elif k == ord("c") and self.selected is not None:
            self.mode = "confirm"
        elif k in (ord("t"), 10, c.KEY_ENTER) and self.selected is not None:
            self.mode = "log"
            self.next_refresh = 0.0
        elif k == ord("r") and self.selected is not None:
            self._act("retry")
        return True

    def _act(self, op: str) -> None:
        jid = self.selected
        self.note = f"{op} job {jid}..."
        self.draw()
        try:
            r = _client.request(op, self.group, ids=[jid])
            notes = r.get("notes") or []
            self.note = notes[0] if notes else f"job {jid}: {'cancelled' if op == 'cancel' else 'queued again'}"
        except (QueueError, OSError) as e:
            self.note = f"job {jid}: {e}"
        self.next_refresh = 0.0

    def run(self) -> int:
        while True:
            if time.monotonic() >= self.next_refresh:
                self.refresh_data()
                self.next_refresh = time.monotonic() + self.interval
            self.draw()
            k = self.screen.getch()
            if k == -1:
                continue
            if k == self.curses.KEY_RESIZE:
                continue
            if not self.key(k):
                return 0
