"""`gpufleet info` and `python -m gpufleet` as real subprocesses: no GPU, simulated GPUs, NVML absent,
NVML failing to initialise, and the NVML path through tests/fake_nvml (a stand-in libnvidia-ml.so.1
with NVML's ABI, since this machine has no driver)."""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

import gpufleet

ROOT = pathlib.Path(__file__).resolve().parents[2]
A100 = "NVIDIA A100-SXM4-40GB|GPU-11111111-aaaa|00000000:17:00.0|42949672960|10737418240|37|8.0|1234:1073741824"
H100 = "NVIDIA H100 80GB HBM3|GPU-22222222-bbbb|00000000:65:00.0|85899345920|85899345920|-|9.0|"
A100B = "NVIDIA A100-SXM4-40GB|GPU-33333333-cccc|00000000:B3:00.0|42949672960|42949672960|0|8.0|"


def gpufleet_cli(*args, env=None, check=True):
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("GPUFLEET_SIMULATED_GPUS", "CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}
    full_env.update(env or {})
    r = subprocess.run([sys.executable, "-m", "gpufleet", *args], capture_output=True, text=True, env=full_env,
                       timeout=60)
    if check:
        assert r.returncode == 0, r.stderr
    return r


@pytest.fixture(scope="session")
def fake_nvml(tmp_path_factory):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build the stand-in NVML")
    out = tmp_path_factory.mktemp("fake_nvml") / "libnvidia-ml.so.1"
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(out), str(ROOT / "tests/fake_nvml/fake_nvml.c")],
                   check=True)
    return str(out)


def test_version_and_help():
    r = gpufleet_cli("--version")
    assert r.stdout.strip() == f"gpufleet {gpufleet.__version__}"
    assert "info" in gpufleet_cli().stdout


def test_info_without_gpu_says_so_and_exits_zero():
    if gpufleet.topology().source in ("nvml", "cuda"):
        pytest.skip("a real GPU is present")
    r = gpufleet_cli("info", env={"GPUFLEET_DISABLE_NVML": "1"})
    assert "No GPU found on this machine." in r.stdout
    assert f"gpufleet {gpufleet.__version__}" in r.stdout
    expected_build = "CUDA compiled in" if gpufleet.build_info()["cuda"] else "CUDA not compiled in"
    assert expected_build in r.stdout
    info = json.loads(gpufleet_cli("info", "--json").stdout)
    assert info["gpus"] == [] and info["source"] == "none"
    assert any("NVML not available" in n for n in info["notes"])


def test_info_on_a_simulated_topology_maps_visible_devices():
    r = gpufleet_cli("info", env={"GPUFLEET_SIMULATED_GPUS": "4", "CUDA_VISIBLE_DEVICES": "3,1"})
    assert "SIMULATED" in r.stdout
    assert "'3,1' -> cuda:0=GPU 3, cuda:1=GPU 1" in r.stdout
    assert "2 GPUs hidden by CUDA_VISIBLE_DEVICES" in r.stdout
    lines = [l for l in r.stdout.splitlines() if "Simulated GPU" in l]
    assert [l.split()[:2] for l in lines] == [["-", "0"], ["cuda:1", "1"], ["-", "2"], ["cuda:0", "3"]]
    info = json.loads(gpufleet_cli("info", "--json", env={"GPUFLEET_SIMULATED_GPUS": "2"}).stdout)
    assert info["source"] == "simulated" and len(info["gpus"]) == 2
    assert any("not real" in n for n in info["notes"])


def test_bad_simulated_spec_is_a_clear_cli_error():
    r = gpufleet_cli("info", env={"GPUFLEET_SIMULATED_GPUS": "[{\"colour\": 1}]"}, check=False)
    assert r.returncode == 2
    assert "unknown key 'colour'" in r.stderr and "Traceback" not in r.stderr


def test_info_through_nvml(fake_nvml):
    env = {"GPUFLEET_NVML_LIBRARY": fake_nvml, "FAKE_NVML_GPUS": ";".join([A100, H100, A100B]),
           "CUDA_DEVICE_ORDER": "PCI_BUS_ID", "CUDA_VISIBLE_DEVICES": "GPU-3333,0"}
    info = json.loads(gpufleet_cli("info", "--json", env=env).stdout)
    assert info["source"] == "nvml" and info["driver_version"] == "999.99.99-fake"
    assert [g["ordinal"] for g in info["gpus"]] == [1, None, 0]
    a = info["gpus"][0]
    assert (a["free_memory"], a["used_memory"], a["utilization"]) == (10 << 30, 30 << 30, 37)
    assert [{k: p[k] for k in ("pid", "used_memory")} for p in a["processes"]] == [{"pid": 1234, "used_memory": 1 << 30}]
    assert set(a["processes"][0]) == {"pid", "used_memory", "user", "command"}   # user/command: test_cli_info_watch
    assert info["gpus"][1]["utilization"] is None and info["gpus"][1]["unknown_fields"] == ["utilization"]
    text = gpufleet_cli("info", env=env).stdout
    assert "source:  NVML" in text and "'GPU-3333,0' -> cuda:0=GPU 2, cuda:1=GPU 0" in text
    assert "unknown here: utilization" in text


def test_nvml_that_fails_to_initialise_is_reported_not_fatal(fake_nvml):
    env = {"GPUFLEET_NVML_LIBRARY": fake_nvml, "FAKE_NVML_GPUS": A100, "FAKE_NVML_INIT_ERROR": "9"}
    info = json.loads(gpufleet_cli("info", "--json", env=env).stdout)
    assert info["source"] in ("none", "cuda")
    assert any("NVML failed to initialise: Driver Not Loaded (9)" in n for n in info["notes"]), info["notes"]


def test_select_through_nvml_in_a_subprocess(fake_nvml):
    code = ("import gpufleet; print([str(d) for d in gpufleet.select_devices(2, min_free_memory='20GiB')])")
    env = dict(os.environ, GPUFLEET_NVML_LIBRARY=fake_nvml, FAKE_NVML_GPUS=";".join([A100, H100, A100B]),
               CUDA_DEVICE_ORDER="PCI_BUS_ID")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    env.pop("GPUFLEET_SIMULATED_GPUS", None)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "['cuda:1', 'cuda:2']"  # the H100 (80 GiB free), then the idle A100


def test_closed_pipe_is_not_a_traceback():
    r = subprocess.run(f"{sys.executable} -m gpufleet info | head -c 5", shell=True, capture_output=True,
                       text=True, env=dict(os.environ, GPUFLEET_SIMULATED_GPUS="64"), timeout=60)
    assert r.stdout == "gpufl" and "Traceback" not in r.stderr
