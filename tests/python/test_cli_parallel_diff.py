"""`gpufleet run` against the real GNU parallel (Debian's `parallel`): the argv of every job, for
generated file names (dots, leading dots, several extensions, trailing slashes, `//`, spaces, quotes,
newlines, unicode), every placeholder and every input form. Parallel runs a program that prints its
argv NUL-separated (exact: no quoting to undo); gpufleet's `--dry-run` prints each job shell-quoted
(one `shlex.join` per job, parsed back exactly), and a few cases run for real to show that the dry
run is what runs. Every difference left is one of README's "Differences from GNU parallel", and
`DOCUMENTED` below asserts each of them so that none drifts."""
from __future__ import annotations

import io
import os
import random
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import gpufleet
from gpufleet.cli import main as cli_main

pytestmark = [pytest.mark.timeout(300),
              pytest.mark.skipif(shutil.which("parallel") is None, reason="needs GNU parallel (Debian: parallel)")]

SEED = int(os.environ.get("GPUFLEET_TEST_SEED", random.randrange(1 << 30)))
FIXED = ["plain", "a.b", "a.b.c", "dir/sub/file.tar.gz", ".hidden", "dir/.hidden", ".a.b", "dir/sub/", "dir.d/",
         "/dir/", "//double", "a//b", "/", ".", "..", "x.", "dir/x.y/", "", "sp ace.txt", "it's.x", 'say "hi".y',
         "tab\there.t", "ünï/cødé.ß", "-dash.d", "{}.txt", "$(x).sh", "a b/c d.e f", " lead", "trail ", "日本/語.テキスト"]
NEWLINE_NAMES = ["new\nline.z", "a\n/b.c", "lead\n.dot", "x/y.z\n", "dir/\n", "\n"]


def _random_names(rng: random.Random, n: int) -> list[str]:
    alphabet = ["a", "b", "z", ".", ".", " ", "'", '"', "ü", "-", "_", "é", "\t"]
    out = []
    for _ in range(n):
        parts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 5))) for _ in range(rng.randint(1, 4))]
        name = "/".join(parts)
        name = rng.choice(["", "", "/", "//", "./"]) + name + rng.choice(["", "", "", "/", "//", ".gz", ".tar.gz"])
        out.append(name)
    return out


@pytest.fixture(scope="module")
def names():
    return FIXED + _random_names(random.Random(SEED), 20)


@pytest.fixture(scope="module")
def dump(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("diff")
    prog = d / "dump"
    prog.write_text("#!/bin/sh\nprintf '%s\\0' \"$#\" \"$@\"\n")
    prog.chmod(0o755)
    return str(prog)


def _parallel(dump: str, args: list[str], stdin: bytes = b"", cwd=None) -> list[list[str]]:
    """Runs the real parallel, one job at a time in input order; each job's argv after the program."""
    r = subprocess.run(["parallel", "-k", "-j1", *args], input=stdin, capture_output=True, cwd=cwd, timeout=120)
    assert r.returncode == 0, (args, r.stderr)
    fields = r.stdout.split(b"\0")
    assert fields[-1] == b""
    fields.pop()
    jobs, i = [], 0
    while i < len(fields):
        n = int(fields[i])
        jobs.append([f.decode("utf-8", "surrogateescape") for f in fields[i + 1:i + 1 + n]])
        i += n + 1
    return jobs


def _split_records(text: str) -> list[str]:
    """Splits gpufleet's dry-run output into one shell-quoted line per job: a newline ends a job only
    outside quotes (shlex.join quotes with '...' and "'" pieces)."""
    out, cur, quote = [], [], None
    for ch in text:
        if quote is None and ch in "'\"":
            quote = ch
        elif ch == quote:
            quote = None
        if ch == "\n" and quote is None:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    assert not cur and quote is None, text
    return out


def _gpufleet(args: list[str], stdin: bytes = b"", cwd=None) -> tuple[int, list[list[str]], str]:
    """`gpufleet run --dry-run ARGS` in this process: (exit status, argv of every job, stderr)."""
    old = sys.stdin, sys.stdout, sys.stderr, os.getcwd()
    out, err = io.BytesIO(), io.StringIO()
    sys.stdin = io.TextIOWrapper(io.BytesIO(stdin))
    sys.stdout = wrapper = io.TextIOWrapper(out, write_through=True)
    sys.stderr = err
    try:
        if cwd:
            os.chdir(cwd)
        rc = cli_main(["run", "--dry-run", *args])
        wrapper.flush()
        text = out.getvalue().decode("utf-8", "surrogateescape")
    finally:
        sys.stdin, sys.stdout, sys.stderr = old[:3]
        wrapper.detach()
        os.chdir(old[3])
    return rc, [shlex.split(rec) for rec in _split_records(text)], err.getvalue()


def _compare(dump: str, template: list[str], sources: list[str], options=(), stdin: bytes = b"", cwd=None,
             label: str = ""):
    rc, ours, err = _gpufleet([*options, "--", dump, *template, *sources], stdin=stdin, cwd=cwd)
    assert rc == 0, (label, err)
    assert all(job[0] == dump for job in ours), ours
    theirs = _parallel(dump, [*options, dump, *template, *sources], stdin=stdin, cwd=cwd)
    ours = [job[1:] for job in ours]
    assert ours == theirs, f"seed {SEED}, {label or template} {sources[:3]}...: ours {ours} != parallel {theirs}"


SINGLE = [["{}"], ["{.}"], ["{/}"], ["{//}"], ["{/.}"], ["{#}"], ["{%}"], ["{1}"], ["{1.}"], ["{1/}"], ["{1//}"],
          ["{1/.}"], ["{-1}"], ["{-1.}"], ["{-1/}"], ["{-1//}"], ["{-1/.}"], ["pre{}post", "{/.}.out"],
          ["{//}/{/.}.x", "{.}{/}"], ["x", "{#}-{%}-{}"], ["{}", "{}", "{.}"], ["noplaceholder", "-v"]]


@pytest.mark.parametrize("template", SINGLE, ids=lambda t: " ".join(t))
def test_every_placeholder_on_awkward_names(dump, names, template):
    _compare(dump, template, [":::", *names])


@pytest.mark.parametrize("template", [["{}"], ["{.}", "{/.}"], ["{/}", "{//}"], ["x{-1/.}y"]],
                         ids=lambda t: " ".join(t))
def test_names_with_newlines_from_a_nul_separated_file(dump, names, tmp_path, template):
    f = tmp_path / "names0"
    f.write_bytes(b"\0".join(n.encode() for n in names + NEWLINE_NAMES))
    _compare(dump, template, ["::::", str(f)], options=["-0"])


@pytest.fixture
def files(tmp_path):
    (tmp_path / "f3").write_text("1.x\ndir/2\n3/\n")
    (tmp_path / "f2").write_text("a b\n.c\n")
    (tmp_path / "empty").write_text("")
    (tmp_path / "nolf").write_text("last.line")
    (tmp_path / "cols").write_text("a,b\nc,d,e\n\nf\n x , y ,\n,lead\n")
    (tmp_path / "cmds").write_text("")
    return tmp_path


MULTI = [
    ("two lists", ["{}"], [":::", "a.1", "b", ":::", "c", "d/e.f"]),
    ("two lists, positional", ["{1}", "{2/.}", "{-1}", "{-2.}"], [":::", "a.1", "b", ":::", "c", "d/e.f"]),
    ("two lists, inside a word", ["x{}y", "{.}"], [":::", "a.1", "b", ":::", "c.d"]),
    ("two lists, appended", ["plain"], [":::", "a", "b c", ":::", "1", "2"]),
    ("only {#}: nothing appended", ["{#}"], [":::", "a", "b"]),
    ("only {%}: nothing appended", ["{%}"], [":::", "a", "b"]),
    ("three lists", ["{3}", "{1}"], [":::", "a", "b", ":::", "c", ":::", "d", "e"]),
    ("linked, shorter second", ["{}"], [":::", "a", "b", "c", ":::+", "1", "2"]),
    ("linked, shorter first", ["{}"], [":::", "a", ":::+", "1", "2", "3"]),
    ("linked then crossed", ["{}"], [":::", "a", "b", ":::", "x", "y", ":::+", "1", "2"]),
    ("three linked", ["{}"], [":::", "a", "b", ":::+", "1", "2", ":::+", "x"]),
    ("files crossed", ["{1}", "{2}"], ["::::", "f3", "f2"]),
    ("files linked", ["{}"], ["::::", "f3", "::::+", "f2"]),
    ("file without final newline", ["{}"], ["::::", "nolf", "f2"]),
    ("file then list", ["{}"], ["::::", "f2", ":::", "p", "q"]),
    ("empty list among others", ["{}"], [":::", ":::", "a", "b"]),
    ("empty list last", ["{}"], [":::", "a", "b", ":::"]),
    ("empty linked list", ["{}"], [":::", "a", "b", ":::+"]),
    ("empty file among others", ["{}"], ["::::", "empty", ":::", "a"]),
    ("every source empty", ["{}"], [":::", ":::"]),
    ("empty file alone", ["{}"], ["::::", "empty"]),
    ("empty file twice", ["{}"], ["::::", "empty", "empty"]),
]


@pytest.mark.parametrize("label,template,sources", MULTI, ids=[m[0] for m in MULTI])
def test_input_forms(dump, files, label, template, sources):
    _compare(dump, template, sources, cwd=files, label=label)


@pytest.mark.parametrize("label,template,sources,options,stdin", [
    ("stdin, no source", ["{}", "{.}"], [], [], b"a.b\n\nc d\n"),
    ("stdin as ::::", ["{}"], ["::::", "-", ":::", "p"], [], b"s1\ns2"),
    ("a lone ::: reads stdin", ["x"], [":::"], [], b"s1\ns2\n"),
    ("-a files", ["{}"], [], ["-a", "f3", "-a", "f2"], b""),
    ("-a then :::", ["{}"], [":::", "p", "q"], ["-a", "f2"], b""),
    ("colsep", ["{}", "{1}", "{2}", "{3}", "x{3}y"], ["::::", "cols"], ["--colsep", ","], b""),
    ("colsep, negative and appended", ["{-1}"], ["::::", "cols"], ["--colsep", ","], b""),
    ("colsep, no placeholder", ["v"], ["::::", "cols"], ["--colsep", ","], b""),
    ("colsep across sources", ["{1}", "{2}", "{3}", "{4}"], [":::", "a,b", ":::", "c,d"], ["--colsep", ","], b""),
    ("colsep regex", ["{1}", "{2}"], [":::", "a  b", " c d", "e\tf"], ["--colsep", "[ \t]+"], b""),
    ("null-separated stdin", ["{}"], [], ["-0"], b"a\nb\0c\0"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_stdin_arg_files_and_columns(dump, files, label, template, sources, options, stdin):
    _compare(dump, template, sources, options=options, stdin=stdin, cwd=files, label=label)


# ---- the documented differences (README: "Differences from GNU parallel") -------------------------

def test_documented_each_word_stays_one_argument_and_no_shell(dump, files):
    rc, ours, _ = _gpufleet(["--", dump, "a b", "", "$HOME", "{}", ":::", "x"])
    assert rc == 0 and ours == [[dump, "a b", "", "$HOME", "x"]]
    assert _parallel(dump, [dump, "a b", "", "$HOME", "{}", ":::", "x"]) == [["a", "b", os.environ["HOME"], "x"]]


def test_documented_a_placeholder_as_the_command_needs_shell(dump):
    rc, ours, _ = _gpufleet(["--", "{}", ":::", f"{dump} a  b"])
    assert rc == 0 and ours == [[f"{dump} a  b"]]                       # one program name, as written
    assert _parallel(dump, ["{}", ":::", f"{dump} a  b"]) == [["a", "b"]]   # parallel: a command line
    rc, ours, _ = _gpufleet(["--shell", "--", "{}", ":::", f"{dump} a  b"])
    assert rc == 0 and ours == [[dump, "a", "b"]]                       # with --shell: the same as parallel


def test_documented_input_beyond_the_sources_is_an_error(dump):
    rc, _, err = _gpufleet(["--", dump, "{3}", ":::", "a", ":::", "b"])
    assert rc == 2 and "uses {3} but there are 2 input sources" in err
    assert _parallel(dump, [dump, "{3}", ":::", "a", ":::", "b"]) == [[]]   # parallel drops the word


@pytest.mark.parametrize("form,theirs", [("{0}", ["a", "b"]), ("{..}", ["{..}", "a.b.c"]), ("{1 .}", ["a.b"]),
                                         ("{=$_.='x'=}", ["a.b.cx"]), ("{+.}", ["{+.}", "a.b.c"])])
def test_documented_forms_gpufleet_does_not_know_are_errors(dump, form, theirs):
    rc, _, err = _gpufleet(["--", dump, form, ":::", "a.b.c"] if form != "{0}" else ["--", dump, form, ":::", "a",
                                                                                     ":::", "b"])
    assert rc == 2 and form in err and "the placeholders are" in err
    args = [dump, form, ":::", "a.b.c"] if form != "{0}" else [dump, form, ":::", "a", ":::", "b"]
    assert _parallel(dump, args) == [theirs]


def test_documented_a_newline_in_a_list_value_stays_in_it(dump):
    rc, ours, _ = _gpufleet(["--", dump, "{}", ":::", "new\nline", "b"])
    assert rc == 0 and ours == [[dump, "new\nline"], [dump, "b"]]
    assert _parallel(dump, [dump, "{}", ":::", "new\nline", "b"]) == [["new"], ["line"], ["b"]]


def test_documented_linked_sources_after_arg_files(dump, files):
    rc, ours, _ = _gpufleet(["-a", "f2", "--", dump, ":::", "p", "q", ":::+", "1", "2"], cwd=files)
    assert rc == 0 and [j[1:] for j in ours] == [["a b", "p", "1"], ["a b", "q", "2"], [".c", "p", "1"],
                                                 [".c", "q", "2"]]
    # parallel's link flags do not count the -a files, so it links the -a file with `::: p q`
    assert _parallel(dump, ["-a", "f2", dump, ":::", "p", "q", ":::+", "1", "2"], cwd=files) == [
        ["a b", "p", "1"], ["a b", "p", "2"], [".c", "q", "1"], [".c", "q", "2"]]


def test_documented_dry_run_shows_slot_1(dump):
    rc, ours, _ = _gpufleet(["-j", "3", "--gpus", "0", "--", dump, "{%}", ":::", "a", "b", "c"])
    assert rc == 0 and [j[1:] for j in ours] == [["1"], ["1"], ["1"]]
    r = subprocess.run(["parallel", "--dry-run", "-j3", "-k", "echo", "{%}", ":::", "a", "b", "c"], capture_output=True,
                       text=True, check=True)
    # parallel numbers the slots its dry run pretends to use, as timing has it (1 2 1, or 1 1 1 ...)
    assert set(r.stdout.split("\n")[:3]) <= {"echo 1", "echo 2", "echo 3"}


def test_documented_colsep_is_a_python_regex(dump):
    rc, _, err = _gpufleet(["--colsep", "\\h", "--", dump, "{1}", ":::", "a b"])
    assert rc == 2 and "is not a regular expression" in err
    assert _parallel(dump, ["--colsep", "\\h", dump, "{1}", ":::", "a b"]) == [["a"]]   # Perl's \h: blank


# ---- real runs: what the dry run prints is what runs, shell cases included ------------------------

def _real(tmp_path, args: list[str], stdin: bytes = b"") -> list[list[str]]:
    """A real `gpufleet run` whose jobs run `dumpf`, which writes its argv to OUT/<task number>."""
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    prog = tmp_path / "dumpf"
    prog.write_text('#!/bin/sh\nprintf \'%s\\0\' "$#" "$@" > "$OUT/$GPUFLEET_TASK_ID"\n')
    prog.chmod(0o755)
    env = dict(os.environ, OUT=str(out), GPUFLEET_SIMULATED_GPUS="2",
               PYTHONPATH=os.path.dirname(os.path.dirname(gpufleet.__file__)))
    r = subprocess.run([sys.executable, "-m", "gpufleet", "run", "--quiet", "-j", "4", *args], input=stdin, env=env,
                       capture_output=True, timeout=100, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    jobs = []
    for i in range(1, len(list(out.iterdir())) + 1):
        fields = (out / str(i)).read_bytes().split(b"\0")[:-1]
        assert int(fields[0]) == len(fields) - 1
        jobs.append([f.decode("utf-8", "surrogateescape") for f in fields[1:]])
    shutil.rmtree(out)
    return jobs


def test_real_runs_match_the_dry_run_and_parallel(dump, names, tmp_path):
    dumpf = str(tmp_path / "dumpf")
    vals = [n for n in names if "\n" not in n][:12]
    template = [dumpf, "{}", "{/.}", "x{//}y", "{#}"]
    ran = _real(tmp_path, ["--gpus", "0", "--", *template, ":::", *vals])
    rc, dry, _ = _gpufleet(["--", *template, ":::", *vals])
    assert ran == [job[1:] for job in dry]
    assert ran == _parallel(dump, [dump, *template[1:], ":::", *vals])


def test_shell_runs_command_lines_like_parallel(dump, names, tmp_path):
    dumpf = str(tmp_path / "dumpf")
    vals = [n for n in names if "\n" not in n][:12]
    # quoted values: any name survives the shell
    ran = _real(tmp_path, ["--gpus", "0", "--shell", "--", dumpf, "{}", "{.}", ":::", *vals])
    assert ran == _parallel(dump, [dump, "{}", "{.}", ":::", *vals])
    # a file of command lines, run with `{}` (and with no command at all): not quoted, as in parallel
    lines = [f"{dumpf} a  b", f'{dumpf} "c d" e\\ f', f"{dumpf} 'g'\"h\" $((1+2))", f"{dumpf}"]
    (tmp_path / "cmds").write_text("\n".join(lines) + "\n")
    want = [["a", "b"], ["c d", "e f"], ["gh", "3"], []]
    assert _real(tmp_path, ["--gpus", "0", "--shell", "--", "{}", "::::", "cmds"]) == want
    assert _real(tmp_path, ["--gpus", "0"], stdin=(tmp_path / "cmds").read_bytes()) == want
    (tmp_path / "pcmds").write_text("\n".join(ln.replace(dumpf, dump) for ln in lines) + "\n")
    assert _parallel(dump, ["{}", "::::", str(tmp_path / "pcmds")]) == want


def test_documented_shell_is_bin_sh(tmp_path):
    env = dict(os.environ, GPUFLEET_SIMULATED_GPUS="1", PYTHONPATH=os.path.dirname(os.path.dirname(gpufleet.__file__)),
               SHELL="/bin/bash")
    r = subprocess.run([sys.executable, "-m", "gpufleet", "run", "--quiet", "--gpus", "0", "--shell", "--",
                        'echo "${BASH_VERSION:-none}"', ":::", "x"], env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "[x] none x"
    r = subprocess.run(["parallel", 'echo "${BASH_VERSION:-none}"', ":::", "x"], env=env, capture_output=True,
                       text=True, timeout=60)
    assert r.stdout.strip() not in ("", "none x")   # parallel uses $SHELL
