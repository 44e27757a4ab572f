"""Callables from anywhere (Note [Callables by value] in python/gpufleet/_serialize.py): functions and
classes defined in ``__main__`` (a script run as a file, ``python -c``, a notebook cell in a real
Jupyter kernel), lambdas and closures through GPUExecutor, spawn and a process pipeline; what cannot
be pickled fails at submit time naming the object; an argument whose unpickling raises fails only
its own call."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest

import gpufleet
from gpufleet import SerializationError

sys.path.insert(0, str(Path(__file__).parent / "dispatch_helpers"))
import exec_funcs as F  # noqa: E402

pytestmark = pytest.mark.timeout(180)

# No `if __name__ == "__main__":` guard on purpose: workers never re-run the user's main module, so
# "BODY" must be printed exactly once.
SCRIPT = r'''
import json, os, sys
import gpufleet

def cube(x):
    return x ** 3

class Offset:
    def __init__(self, k):
        self.k = k
    def __call__(self, x):
        return x + self.k

def make_scaler(k):
    def scale(x):
        return x * k
    return scale

def rank_writes(rank, out_dir, tag):
    with open(os.path.join(out_dir, f"{tag}{rank}"), "w") as f:
        f.write(str(cube(rank + 2)))

model = None
CACHE = {}

def load(k):  # an initializer that sets the script's globals, as with ProcessPoolExecutor
    global model
    model = k * 2
    CACHE["w"] = k * 3

def use(x):
    return [model, CACHE.get("w"), threshold, x]

out_dir, bias = sys.argv[1], int(sys.argv[2])
threshold = bias + 1
print("BODY", os.getpid(), flush=True)
res = {}
with gpufleet.GPUExecutor(devices="cpu", workers=2, progress=True) as ex:
    res["main_fn"] = list(ex.map(cube, range(6)))
    res["lambda"] = list(ex.map(lambda x: x + bias, range(6)))
    res["closure"] = list(ex.map(make_scaler(bias), range(6)))
    res["instance"] = ex.submit(Offset(bias), 1).result()
    back = ex.submit(Offset, bias).result()
    res["class_identity"] = type(back) is Offset and back(0) == bias
    res["pids"] = sorted({p for _, p in ex.workers})
with gpufleet.GPUExecutor(devices="cpu", workers=1, initializer=load, initargs=(bias,)) as ex:
    res["globals"] = list(ex.map(use, range(2)))
    threshold = bias + 2  # rebound in the parent: the worker takes the new value, keeps its own others
    res["globals"] += list(ex.map(use, range(2)))
gpufleet.spawn(rank_writes, args=(out_dir, "main"), devices="cpu", nprocs=2)
gpufleet.spawn(lambda rank, d: open(os.path.join(d, f"lambda{rank}"), "w").write(str(rank * bias)),
               args=(out_dir,), devices="cpu", nprocs=2)
res["pipeline"] = (gpufleet.Pipeline(range(7), ordered=True)
                   .map(lambda x: cube(x) + bias, workers=2, processes=True).run().results)
print("RESULT", json.dumps(res), flush=True)
'''


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(gpufleet.__file__)),
                                         env.get("PYTHONPATH", "")])
    return env


def _check(stdout: str, out_dir: Path, bias: int) -> None:
    lines = stdout.splitlines()
    assert sum(ln.startswith("BODY") for ln in lines) == 1, stdout  # the body ran in the parent only
    res = json.loads(next(ln for ln in lines if ln.startswith("RESULT"))[len("RESULT "):])
    assert res["main_fn"] == [x ** 3 for x in range(6)]
    assert res["lambda"] == [x + bias for x in range(6)]
    assert res["closure"] == [x * bias for x in range(6)]
    assert res["instance"] == 1 + bias and res["class_identity"] is True
    assert res["pipeline"] == [x ** 3 + bias for x in range(7)]
    # Note [Globals of functions sent by value]
    assert res["globals"] == [[2 * bias, 3 * bias, bias + 1, 0], [2 * bias, 3 * bias, bias + 1, 1],
                              [2 * bias, 3 * bias, bias + 2, 0], [2 * bias, 3 * bias, bias + 2, 1]]
    assert [(out_dir / f"main{r}").read_text() for r in range(2)] == ["8", "27"]
    assert [(out_dir / f"lambda{r}").read_text() for r in range(2)] == ["0", str(bias)]


@pytest.mark.parametrize("how", ["file", "-c"])
def test_main_functions_lambdas_and_closures_from_a_script(tmp_path, how):
    bias = random.randint(3, 1000)
    if how == "file":
        script = tmp_path / "user_script.py"
        script.write_text(SCRIPT)
        argv = [sys.executable, str(script)]
    else:
        argv = [sys.executable, "-c", SCRIPT]
    p = subprocess.run(argv + [str(tmp_path), str(bias)], env=_env(), capture_output=True, text=True,
                       timeout=150, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    _check(p.stdout, tmp_path, bias)
    # progress into a pipe: plain lines (Note [Progress modes]), never a cursor code
    assert "gpufleet executor: 20 call" in p.stderr and "\x1b" not in p.stderr and "\r" not in p.stderr, p.stderr


NOTEBOOK_CELLS = [
    "import json, os, sys\nimport gpufleet\nout_dir, bias = {out_dir!r}, {bias}",
    "def cube(x):\n    return x ** 3\n\nclass Offset:\n    def __init__(self, k):\n        self.k = k\n"
    "    def __call__(self, x):\n        return x + self.k\n\ndef make_scaler(k):\n    def scale(x):\n"
    "        return x * k\n    return scale\n\ndef rank_writes(rank, out_dir, tag):\n"
    "    with open(os.path.join(out_dir, f'{{tag}}{{rank}}'), 'w') as f:\n        f.write(str(cube(rank + 2)))",
    "res = {{}}\nwith gpufleet.GPUExecutor(devices='cpu', workers=2, progress=True) as ex:\n"
    "    res['main_fn'] = list(ex.map(cube, range(6)))\n"
    "    res['lambda'] = list(ex.map(lambda x: x + bias, range(6)))\n"
    "    res['closure'] = list(ex.map(make_scaler(bias), range(6)))\n"
    "    res['instance'] = ex.submit(Offset(bias), 1).result()\n"
    "    back = ex.submit(Offset, bias).result()\n"
    "    res['class_identity'] = type(back) is Offset and back(0) == bias",
    "model = None\nCACHE = {{}}\nthreshold = bias + 1\n"
    "def load(k):\n    global model\n    model = k * 2\n    CACHE['w'] = k * 3\n"
    "def use(x):\n    return [model, CACHE.get('w'), threshold, x]\n"
    "ex2 = gpufleet.GPUExecutor(devices='cpu', workers=1, initializer=load, initargs=(bias,))\n"
    "res['globals'] = list(ex2.map(use, range(2)))\n",
    "threshold = bias + 2  # a cell run again with a new value\n"
    "res['globals'] += list(ex2.map(use, range(2)))\nex2.shutdown()\n",
    "gpufleet.spawn(rank_writes, args=(out_dir, 'main'), devices='cpu', nprocs=2)\n"
    "gpufleet.spawn(lambda rank, d: open(os.path.join(d, f'lambda{{rank}}'), 'w').write(str(rank * bias)),\n"
    "               args=(out_dir,), devices='cpu', nprocs=2)",
    "res['pipeline'] = (gpufleet.Pipeline(range(7), ordered=True)\n"
    "                   .map(lambda x: cube(x) + bias, workers=2, processes=True).run().results)\n"
    "print('BODY', os.getpid())\nprint('RESULT', json.dumps(res))",
]


def test_notebook_cell_functions_in_a_real_jupyter_kernel(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    bias = random.randint(3, 1000)
    monkeypatch.setenv("PYTHONPATH", _env()["PYTHONPATH"])  # the kernel inherits it
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c.format(out_dir=str(tmp_path), bias=bias))
                                         for c in NOTEBOOK_CELLS])
    client = nbclient.NotebookClient(nb, timeout=150, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outs = [o for cell in nb.cells for o in cell.get("outputs", [])]
    assert not [o for o in outs if o["output_type"] == "error"], outs
    stdout = "".join(o["text"] for o in outs if o["output_type"] == "stream" and o["name"] == "stdout")
    stderr = "".join(o["text"] for o in outs if o["output_type"] == "stream" and o["name"] == "stderr")
    _check(stdout, tmp_path, bias)
    # progress in a kernel without widgets: plain lines (Note [Progress modes]), no cursor codes
    assert "gpufleet executor" in stderr and "\x1b" not in stderr and "\r" not in stderr, stderr


def test_lambdas_and_closures_in_process(sim_gpus):
    sim_gpus(2)
    k = random.randint(2, 99)

    def closure(x):
        return x * k

    with gpufleet.GPUExecutor() as ex:
        assert list(ex.map(lambda x: x - k, range(5))) == [x - k for x in range(5)]
        assert ex.submit(closure, 3).result() == 3 * k
        assert ex.submit(F.square, 7).result() == 49  # importable: by reference


def test_an_unpicklable_argument_fails_at_submit_naming_it(sim_gpus):
    sim_gpus(1)
    lock = threading.Lock()
    with gpufleet.GPUExecutor() as ex:
        with pytest.raises(SerializationError, match=r"argument 1 of submit\(\) \(at \['lock'\]\) cannot be sent "
                                                      r"to a worker process: .*lock.*cannot pickle '_thread.lock'"):
            ex.submit(F.square, 1, {"lock": lock, "n": 2})
        with pytest.raises(SerializationError, match=r"keyword argument 'guard' of submit\(\)"):
            ex.submit(F.square, 1, guard=lock)
        with pytest.raises(SerializationError, match=r"the function .*<lambda> of submit\(\) \(at its closure variable 'lock'\)"):
            ex.submit(lambda: lock)
        with pytest.raises(TypeError):  # SerializationError is also a TypeError and a PicklingError
            ex.submit(F.square, lock)
        assert ex.submit(F.square, 6).result() == 36  # nothing was queued; the executor goes on
    with pytest.raises(SerializationError, match=r"the function and args of spawn\(\) \(at \[1\]\[0\]\)"):
        gpufleet.spawn(F.rank_env, args=(lock,), devices="cpu", nprocs=1)
    r = gpufleet.Pipeline([1, lock, 3], on_error="skip").map(F.square, processes=True).run()
    assert sorted(r.results) == [1, 9] and len(r.errors) == 1
    assert isinstance(r.errors[0].error, SerializationError) and r.errors[0].index == 1


def test_an_argument_that_fails_to_unpickle_fails_its_call_only(sim_gpus):
    sim_gpus(1)
    why = f"reason-{random.randint(0, 10**6)}"
    with gpufleet.GPUExecutor() as ex:
        (_, pid), = ex.workers
        with pytest.raises(ValueError, match=f"refusing to rebuild: {why}") as info:
            ex.submit(F.square, F.Unrebuildable(why)).result()
        assert isinstance(info.value.__cause__, gpufleet.RemoteTraceback)
        assert "_refuse_to_rebuild" in info.value.__cause__.tb
        assert ex.submit(F.where, 1).result()["pid"] == pid  # the same worker lives on
        assert ex.workers == [("cuda:0", pid)]
