"""GNU-parallel-style placeholders for command templates (shared by ``gpufleet.product`` and
``gpufleet run``).

``{}`` every input joined by a space, ``{N}`` input N (1-based), with the modifiers ``.`` (no
extension), ``/`` (basename), ``//`` (dirname) and ``/.`` (basename without extension): ``{.}``,
``{/}``, ``{//}``, ``{/.}``, ``{2/.}``; ``{#}`` the task number (1-based); ``{output}`` the
temporary name of the declared output (renamed into place on success). Expansion is one pass over
the template: text coming from inputs (a file name containing ``{}`` or ``$(...)``) is never
expanded again, and each template word stays one argv element (no shell).
"""
from __future__ import annotations

import os
import re
import shlex
from typing import Optional, Sequence

_PLACEHOLDER = re.compile(r"\{(\d*)(\.|/|//|/\.)?\}|\{#\}|\{output\}")


def has_placeholder(template: Sequence[str]) -> bool:
    return any(_PLACEHOLDER.search(w) for w in template)


def has_input_placeholder(template: Sequence[str]) -> bool:
    return any(m.group(0) not in ("{#}", "{output}") for w in template for m in _PLACEHOLDER.finditer(w))


def _modify(value: str, mod: Optional[str]) -> str:
    if mod is None:
        return value
    if mod == ".":
        root, ext = os.path.splitext(value)
        return root if ext else value
    if mod == "/":
        return os.path.basename(value)
    if mod == "//":
        d = os.path.dirname(value)
        return d if d else "."
    if mod == "/.":
        return os.path.splitext(os.path.basename(value))[0]
    raise AssertionError(mod)


def expand(word: str, inputs: Sequence[str], seq1: int, output: Optional[str], *, quote: bool = False) -> str:
    """Expands the placeholders of one template word. ``quote`` shell-quotes each substituted value
    (for ``--shell`` templates). Raises ValueError for ``{N}`` beyond the inputs or ``{output}``
    without a declared output."""

    def sub(m: re.Match) -> str:
        text = m.group(0)
        if text == "{#}":
            value = str(seq1)
        elif text == "{output}":
            if output is None:
                raise ValueError("the command uses {output} but no output was declared (--output / outputs=)")
            return output  # never quoted here: callers substitute (and quote) it later
        else:
            idx, mod = m.group(1), m.group(2)
            if idx:
                n = int(idx)
                if n < 1 or n > len(inputs):
                    raise ValueError(f"placeholder {text} refers to input {n}, but there {'is' if len(inputs) == 1 else 'are'} "
                                     f"{len(inputs)} input{'s' if len(inputs) != 1 else ''}")
                value = _modify(inputs[n - 1], mod)
            else:
                value = " ".join(_modify(v, mod) for v in inputs)
        return shlex.quote(value) if quote else value

    return _PLACEHOLDER.sub(sub, word)
