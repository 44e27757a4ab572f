"""`--watch` for the commands that have it (`gpufleet info`, `gpufleet ls`): refresh until Ctrl-C."""
from __future__ import annotations

import json
import sys
import time
from typing import Callable, Optional


def watch(snapshot: Callable[[], dict], render: Callable[[dict], str], title: str, interval: float,
          count: Optional[int], as_json: bool) -> int:
    """Refreshes until Ctrl-C (or ``count`` refreshes). On a terminal each refresh redraws the screen
    from its top (home, clear to the end), as watch(1) does; elsewhere every refresh is a plain block
    (a header line, the table, a blank line) and no escape code is written; with ``as_json`` one
    object a line, with its time."""
    tty = sys.stdout.isatty() and not as_json
    n = 0
    try:
        while True:
            data = snapshot()
            stamp = time.strftime("%Y-%m-%d %H:%M:%S")
            if as_json:
                data["time"] = time.time()
                sys.stdout.write(json.dumps(data) + "\n")
            else:
                block = f"Every {interval:g}s: {title}    {stamp}\n\n{render(data)}\n"
                sys.stdout.write(("\x1b[H\x1b[J" + block) if tty else block + "\n")
            sys.stdout.flush()
            n += 1
            if count is not None and n >= count:
                return 0
            time.sleep(interval)
    except KeyboardInterrupt:  # the way to leave a watch: the last table stays on the screen
        return 0


def check(interval: float, count: Optional[int]) -> None:
    if not interval > 0:
        raise ValueError(f"--watch {interval}: expected a number of seconds > 0")
    if count is not None and count < 1:
        raise ValueError(f"--count {count}: expected at least 1 refresh")
