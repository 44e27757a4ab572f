"""`gpufleet run` as a real subprocess: placeholders, ::: and :::: inputs, hostile file names,
--output/--resume/--dry-run/--trace/--timeline, exit statuses; gpufleet.product."""
from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from pathlib import Path

import pytest

import gpufleet
from gpufleet._dispatch_template import expand

pytestmark = pytest.mark.timeout(120)


def _cli(*args, cwd=None, sim="2", stdin=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(gpufleet.__file__)), env.get("PYTHONPATH", "")])
    env["GPUFLEET_SIMULATED_GPUS"] = sim
    return subprocess.run([sys.executable, "-m", "gpufleet", "run", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, input=stdin, timeout=100)


HOSTILE = ["a b.txt", "it's.txt", 'say "hi".txt', "x; touch pwned.txt", "$(touch pwned2).txt", "`id`.txt",
           "new\nline.txt", "{}.txt", "{output}.txt", "-dash.txt", "ünïcødé.txt"]


def test_placeholders_match_gnu_parallel():
    row = ["dir/sub/clip.final.mp4", "img.jpg"]
    assert expand("{}", row, 7, None) == "dir/sub/clip.final.mp4 img.jpg"
    assert expand("{1.}", row, 7, None) == "dir/sub/clip.final"
    assert expand("{1/}", row, 7, None) == "clip.final.mp4"
    assert expand("{1//}", row, 7, None) == "dir/sub"
    assert expand("{1/.}_{2/.}#{#}", row, 7, None) == "clip.final_img#7"
    assert expand("{/}", ["noext"], 1, None) == "noext" and expand("{//}", ["noext"], 1, None) == "."
    assert expand("{2}", ["{1}", "$(x)"], 1, None) == "$(x)"  # substituted text is never expanded again
    with pytest.raises(ValueError, match="refers to input 3, but there are 2 inputs"):
        expand("{3}", row, 1, None)


def test_hostile_file_names_pass_untouched(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i, name in enumerate(HOSTILE):
        (src / name).write_text(f"content {i} " + "".join(random.choices(string.ascii_letters, k=random.randint(1, 50))))
    r = _cli("--quiet", "--output", "out/{/}.copy", "--", "cp", "--", "{}", "{output}", ":::",
             *[str(src / n) for n in HOSTILE], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in HOSTILE:
        assert (tmp_path / "out" / f"{name}.copy").read_text() == (src / name).read_text()
    assert not list(tmp_path.rglob("pwned*"))
    # the same through a shell, when asked for explicitly: inputs are quoted
    r = _cli("--quiet", "--shell", "--gpus", "0", "--output", "sh/{/}", "--", "cat", "{}", ">", "{output}", ":::",
             *[str(src / n) for n in HOSTILE], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for name in HOSTILE:
        assert (tmp_path / "sh" / name).read_text() == (src / name).read_text()
    assert not list(tmp_path.rglob("pwned*"))


def test_inputs_from_lists_files_and_cartesian_product(tmp_path):
    (tmp_path / "list").write_text("x\ny\n")
    r = _cli("--quiet", "--gpus", "0", "--", "sh", "-c", 'echo "$1-$2" > "$3"', "_", "{1}", "{2}", "{#}.res",
             ":::", "a", "b", "c", "::::", str(tmp_path / "list"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    got = sorted((tmp_path / f"{i}.res").read_text().strip() for i in range(1, 7))
    assert got == sorted(f"{a}-{b}" for a in "abc" for b in "xy")
    # no placeholder: inputs are appended, like GNU parallel; `-` reads stdin
    r = _cli("--dry-run", "--", "echo", "hi", "::::", "-", stdin="one\ntwo words\n")
    assert r.stdout.splitlines() == ["echo hi one", "echo hi 'two words'"]


def test_exit_status_counts_failures_and_summary(tmp_path):
    r = _cli("--gpus", "0", "--quarantine-after", "0", "--", "sh", "-c", "exit $1", "_", ":::", "0", "3", "0", "4",
             cwd=tmp_path)
    assert r.returncode == 2
    assert "4 tasks" in r.stderr and "2 failed" in r.stderr and "exit status 3" in r.stderr
    r = _cli("--quiet", "--", "true", ":::", "1", "2", cwd=tmp_path)
    assert r.returncode == 0
    r = _cli("--output", "o.txt", "--", "true")
    assert r.returncode == 2 and "never uses {output}" in r.stderr
    r = _cli("--resume", "--", "true")
    assert r.returncode == 2 and "--resume needs --journal" in r.stderr


def test_resume_trace_and_timeline_from_the_cli(tmp_path):
    log = tmp_path / "ran"
    args = ["--journal", "j.sqlite", "--output", "o/{}.txt", "--trace", "t.json", "--timeline", "t.png", "--",
            "sh", "-c", f'echo "$1" >> {log}; {{ [ "$1" != 3 ] || [ -e ok ]; }} && echo "$1" > "$2"', "_", "{}", "{output}",
            ":::", "1", "2", "3", "4"]
    r = _cli(*args, cwd=tmp_path)
    assert r.returncode == 1, r.stderr
    assert json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    (tmp_path / "ok").touch()
    r = _cli("--resume", *args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert sorted(log.read_text().split()) == ["1", "2", "3", "3", "4"]  # only the failed one ran again
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["1.txt", "2.txt", "3.txt", "4.txt"]


def test_product_builds_seed_000_tasks(tmp_path, sim_gpus):
    sim_gpus(2)
    vids = [tmp_path / f"v{i}.mp4" for i in range(3)]
    imgs = [tmp_path / f"i{i}.jpg" for i in range(2)]
    for p in vids + imgs:
        p.write_text(p.name)
    tasks = gpufleet.product(["sh", "-c", 'cat "$1" "$2" > "$3"', "swap", "{1}", "{2}", "{output}"],
                             str(tmp_path / "v*.mp4"), [str(p) for p in imgs], output=str(tmp_path / "out/{1/.}_{2/.}.mp4"))
    rep = gpufleet.run(tasks, quiet=True)
    assert rep.succeeded == 6
    for v in vids:
        for i in imgs:
            assert (tmp_path / "out" / f"{v.stem}_{i.stem}.mp4").read_text() == v.name + i.name
    with pytest.raises(ValueError, match="matches no file"):
        list(gpufleet.product(["true"], str(tmp_path / "*.nothing")))
