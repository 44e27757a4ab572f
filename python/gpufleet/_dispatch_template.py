"""GNU parallel's replacement strings for command templates (shared by ``gpufleet.product`` and
``gpufleet run``).

Note [Placeholders as GNU parallel]
~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~~
Each placeholder means exactly what it means in GNU parallel 20221122 (its own definitions, which are
Perl substitutions, are translated one for one; the differential test against the real ``parallel``
in tests/python/test_cli_parallel_diff.py is the judge):

- ``{}`` the inputs; ``{.}`` without extension (``s:\\.[^/.]*$::``: ``.hidden`` gives an empty
  string, ``dir/.hidden`` gives ``dir/``); ``{/}`` basename (``s:.*/::``); ``{//}`` dirname as Perl's
  ``File::Basename::dirname`` (``dir/sub/`` gives ``dir``, ``//x`` gives ``/``); ``{/.}`` both;
- ``{n}`` input source ``n`` (1-based), ``{-n}`` counted from the last, each with the same modifiers
  (``{2/.}``, ``{-1//}``); ``{#}`` the task number (1-based); ``{%}`` the job slot (1-based);
- ``{output}``: gpufleet's own, the temporary name of the declared output.

With several inputs, ``{}`` (and ``{.}`` ...) stand for all of them, one argument each, exactly as
parallel's quoted ``'a' 'b'`` reaches the program (``x{}y`` gives ``xa`` and ``by``). A template that
uses any placeholder gets no inputs appended; one without gets them appended (one argument each).

The deliberate differences (README, "Coming from GNU parallel"): no shell unless asked, so every
template word stays one argument (parallel joins the words and lets the shell split them again), and
a placeholder in the first word is not run as a command line; forms parallel has and gpufleet does
not (``{=perl=}``, ``{..}``, ``{+/}``, ``{1#}``, ``{0}`` ...) are an error naming the form instead of
a literal; ``{n}`` beyond the input sources is an error (parallel drops the word), except for
``--colsep`` columns that a line lacks, which vanish as in parallel.

With a shell (``--shell``), the words are joined with spaces into one command line for ``/bin/sh
-c`` and every value is shell-quoted, except, as in parallel, when the command itself (its first
word) holds a placeholder: then no value is quoted, so ``{}`` over a file of command lines runs them.

Note [Job slot placeholder]
~~~~~~~~~~~~~~~~~~~~~~~~~~~
``{%}`` is the job slot (1 to the number of slots, never shared by two running tasks), known only
when the dispatcher starts the task. Expansion leaves ``JOB_SLOT_MARK`` in the word; the C++
scheduler replaces it at launch with ``1 + position * slots_per_device + slot`` (GPU tasks) or
``1 + cpu slot`` (CPU tasks). ``--dry-run`` shows 1, the slot of a run one task at a time.
"""
from __future__ import annotations

import re
import shlex
from typing import Optional, Sequence, Union

JOB_SLOT_MARK = "\0gfslot\0"   # replaced by csrc/dispatch/scheduler.cpp; NUL never occurs in argv
ACCEPTED = "{} {.} {/} {//} {/.} {#} {%} {n} {n.} {n/} {n//} {n/.} {-n} (and {-n.} ...), {output}"

# The accepted forms. The modifier alternatives are tried in order, so "{//}" is not read as "{/}".
_PLACEHOLDER = re.compile(r"\{(-?\d+)?(\.|/|//|/\.)?\}|\{#\}|\{%\}|\{output\}")
# Forms that look like a replacement string of GNU parallel (perl expressions, --plus strings,
# positional forms with other modifiers) but that gpufleet does not accept: an error, never a literal.
_LOOKALIKE = re.compile(r"\{=.*?=\}|\{-?\d+\s*[./#%+][^{}\s]*\}|\{-?\d+\s+\}|\{[./#%+][^{}\s]*\}", re.S)

# GNU parallel's definitions (Perl; Python's re agrees on ".", "$" and negated classes here).
_EXT = re.compile(r"\.[^/.]*$")      # {.}   s:\.[^/.]*$::
_DIRPART = re.compile(r".*/")         # {/}   s:.*/::


def _perl_dirname(path: str) -> str:
    """``File::Basename::dirname`` on Unix, which ``{//}`` calls: trailing slashes do not make a
    directory part, ``.`` when there is none, and the root stays ``/``."""

    def fileparse(p: str) -> tuple[str, str]:
        m = re.match(r"(.*/)?(.*)", p, re.S)
        return (m.group(1) or "./"), m.group(2)

    def strip_trailing_sep(p: str) -> str:
        return re.sub(r"(.)/*\Z", r"\1", p, count=1, flags=re.S)

    dirpath, base = fileparse(path)
    dirpath = strip_trailing_sep(dirpath)
    if not base:
        dirpath, base = fileparse(dirpath)
        dirpath = strip_trailing_sep(dirpath)
    return dirpath


def _modify(value: str, mod: Optional[str]) -> str:
    if mod is None:
        return value
    if mod == ".":
        return _EXT.sub("", value, count=1)
    if mod == "/":
        return _DIRPART.sub("", value, count=1)
    if mod == "//":
        return _perl_dirname(value)
    if mod == "/.":
        return _EXT.sub("", _DIRPART.sub("", value, count=1), count=1)
    raise AssertionError(mod)


def check_template(words: Sequence[str]) -> None:
    """Raises ValueError naming the first ``{...}`` that looks like a replacement string of GNU
    parallel but is not one gpufleet accepts (``{=...=}``, ``{..}``, ``{1#}``, ``{0}`` ...)."""
    for w in words:
        for m in _PLACEHOLDER.finditer(w):
            if m.group(1) is not None and int(m.group(1)) == 0:
                raise ValueError(f"placeholder {m.group(0)} in {w!r}: inputs are numbered from 1 ({{1}}, {{2}} ...; "
                                 f"{{-1}} is the last); the placeholders are {ACCEPTED}")
        bad = _LOOKALIKE.search(_PLACEHOLDER.sub(" ", w))
        if bad:
            what = "a perl expression" if bad.group(0).startswith("{=") else "not a placeholder gpufleet knows"
            raise ValueError(f"{bad.group(0)!r} in {w!r} is {what}; the placeholders are {ACCEPTED}")


def max_input_index(words: Sequence[str]) -> int:
    """The largest ``n`` of ``{n...}``/``{-n...}`` used (0 when none)."""
    return max((abs(int(m.group(1))) for w in words for m in _PLACEHOLDER.finditer(w) if m.group(1)), default=0)


def has_placeholder(template: Sequence[str]) -> bool:
    return any(_PLACEHOLDER.search(w) for w in template)


class _Missing(str):
    """A ``--colsep`` column the line lacks: empty, and a word made only of such vanishes (parallel
    substitutes it unquoted, so the shell drops the empty word)."""


def _values(m: re.Match, inputs: Sequence[str], seq1: int, output: Optional[str], missing_ok: bool) -> list:
    text = m.group(0)
    if text == "{#}":
        return [str(seq1)]
    if text == "{%}":
        return [JOB_SLOT_MARK]
    if text == "{output}":
        if output is None:
            raise ValueError("the command uses {output} but no output was declared (--output / outputs=)")
        return [output]
    idx, mod = m.group(1), m.group(2)
    if idx is None:
        return [_modify(v, mod) for v in inputs]
    n = int(idx)
    i = n - 1 if n > 0 else len(inputs) + n
    if n == 0 or not 0 <= i < len(inputs):
        if missing_ok and n != 0:
            return [_Missing()]
        raise ValueError(f"placeholder {text} refers to input {n}, but there {'is' if len(inputs) == 1 else 'are'} "
                         f"{len(inputs)} input{'s' if len(inputs) != 1 else ''}")
    return [_modify(inputs[i], mod)]


def expand_words(word: str, inputs: Sequence[str], seq1: int, output: Optional[str] = None, *,
                 missing_ok: bool = False) -> list[str]:
    """The argv words one template word becomes (Note [Placeholders as GNU parallel]): one, or one
    per input where ``{}`` stands for several; none when only missing ``--colsep`` columns made it."""
    pieces, solid = [""], [not word]  # an empty template word stays an (empty) argument
    pos = 0
    for m in _PLACEHOLDER.finditer(word):
        if m.start() > pos:
            pieces[-1] += word[pos:m.start()]
            solid[-1] = True
        vals = _values(m, inputs, seq1, output, missing_ok)
        for k, v in enumerate(vals):
            if k:
                pieces.append("")
                solid.append(False)
            pieces[-1] += v
            solid[-1] = solid[-1] or not isinstance(v, _Missing)
        pos = m.end()
    if pos < len(word):
        pieces[-1] += word[pos:]
        solid[-1] = True
    return [str(p) for p, s in zip(pieces, solid) if s or p]


def expand(word: str, inputs: Sequence[str], seq1: int, output: Optional[str]) -> str:
    """One template word expanded into one string (``--output``/``--name`` templates): several
    values of ``{}`` are joined by a space."""

    def sub(m: re.Match) -> str:
        return " ".join(_values(m, inputs, seq1, output, False))

    return _PLACEHOLDER.sub(sub, word)


def command_is_placeholder(words: Sequence[str]) -> bool:
    """GNU parallel's rule for not quoting: the command (the text before the first space, tab,
    newline or '=') holds a replacement string (``{}``, ``my_{}``, ``{2}``)."""
    first = re.match(r"[^ \t\n=]*", " ".join(words)).group(0)
    return bool(_PLACEHOLDER.search(first))


def shell_line(words: Sequence[str], inputs: Sequence[str], seq1: int, output: Optional[str] = None, *,
               missing_ok: bool = False, unquoted: Optional[bool] = None) -> str:
    """The ``/bin/sh -c`` command line of a ``--shell`` template: the words joined by spaces, each
    value shell-quoted unless the command itself is a placeholder (then none is, as in parallel)."""
    if unquoted is None:
        unquoted = command_is_placeholder(words)

    def sub(m: re.Match) -> str:
        vals = _values(m, inputs, seq1, output, missing_ok)
        if m.group(0) in ("{output}", "{%}", "{#}") or unquoted:
            return " ".join(vals)
        return " ".join("" if isinstance(v, _Missing) else shlex.quote(v) for v in vals)

    return " ".join(_PLACEHOLDER.sub(sub, w) for w in words)


def expand_command(template: Sequence[str], inputs: Sequence[str], seq1: int, output: Optional[str] = None, *,
                   shell: bool = False, missing_ok: bool = False) -> Union[list, str]:
    """A whole task's command: the argv list, or with ``shell`` the command line for ``/bin/sh -c``.
    Inputs are appended (one argument each) when the template uses no placeholder at all."""
    words = list(template)
    if inputs and not has_placeholder(words):
        words.append("{}")
    if shell:
        return shell_line(words, inputs, seq1, output, missing_ok=missing_ok)
    return [a for w in words for a in expand_words(w, inputs, seq1, output, missing_ok=missing_ok)]
