"""The device layer from Python: Device strings, CUDA_VISIBLE_DEVICES, discovery, selection on
simulated topologies, seeding, and the build flavour on this driverless machine."""
from __future__ import annotations

import os
import pickle
import random
import threading
import time

import numpy as np
import pytest

import gpufleet
from gpufleet import _core


# ---- Device -------------------------------------------------------------------------------------

@pytest.mark.parametrize("text", ["cpu", "cuda", "cuda:0", "cuda:1", "cuda:15", "cpu:0"])
def test_device_string_round_trips(text):
    d = gpufleet.Device(text)
    assert str(d) == text
    assert gpufleet.Device(str(d)) == d
    assert hash(gpufleet.Device(str(d))) == hash(d)


@pytest.mark.parametrize(
    "bad, why",
    [
        ("", "empty"),
        ("cuda:", "missing"),
        ("cuda:01", "leading zero"),
        ("cuda:-1", "not a non-negative integer"),
        (" cuda", "unknown device type ' cuda'"),
        ("gpu", "unknown device type 'gpu'"),
        ("CUDA", "unknown device type 'CUDA'"),
        ("cuda:1:2", "not a non-negative integer"),
        ("cuda:x", "not a non-negative integer"),
        ("cuda:0 ", "not a non-negative integer"),
    ],
)
def test_bad_device_strings_name_the_string_and_the_forms(bad, why):
    with pytest.raises(ValueError) as e:
        gpufleet.Device(bad)
    msg = str(e.value)
    assert f"'{bad}'" in msg and why in msg and "cuda:N" in msg


def test_device_value_semantics():
    assert gpufleet.Device("cuda") != gpufleet.Device("cuda:0")
    assert gpufleet.Device("cuda").index is None
    assert gpufleet.Device("cuda:3").type == "cuda" and gpufleet.Device("cuda:3").index == 3
    assert gpufleet.Device("cuda", 2) == gpufleet.Device("cuda:2") and str(gpufleet.Device("cuda", 2)) == "cuda:2"
    # equal to Devices only, as torch.device ("cuda:1" == torch.device("cuda:1") is False)
    assert gpufleet.Device("cuda:2") != "cuda:2" and not gpufleet.Device("cuda:2") == "cuda:2"
    assert gpufleet.Device("cuda", None) == gpufleet.Device("cuda")
    assert gpufleet.Device(2) == gpufleet.Device("cuda:2")
    assert repr(gpufleet.Device("cuda:2")) == "device(type='cuda', index=2)"
    assert repr(gpufleet.Device("cpu")) == "device(type='cpu')"
    assert len({gpufleet.Device("cuda:1"), gpufleet.Device("cuda", 1), gpufleet.Device("cpu")}) == 2
    assert pickle.loads(pickle.dumps(gpufleet.Device("cuda:7"))) == gpufleet.Device("cuda:7")
    assert gpufleet.Device("cpu") != 0 and gpufleet.Device("cpu") != "not a device"


class TorchLikeDevice:
    def __init__(self, type, index):
        self.type, self.index = type, index


def test_device_accepts_torch_like_objects():
    assert gpufleet.Device(TorchLikeDevice("cuda", 1)) == gpufleet.Device("cuda:1")
    assert gpufleet.Device(TorchLikeDevice("cpu", None)) == gpufleet.Device("cpu")
    assert gpufleet.as_device(gpufleet.Device("cuda:4")) == gpufleet.Device("cuda:4")


@pytest.mark.parametrize("bad", [1.5, None, [0], True, object()])
def test_device_rejects_other_types_with_type_error(bad):
    with pytest.raises(TypeError, match="expected a device"):
        gpufleet.Device(bad)


def test_device_rejects_bad_indices():
    with pytest.raises(ValueError, match="-1"):
        gpufleet.Device(-1)
    with pytest.raises(ValueError, match="already has an index"):
        gpufleet.Device("cuda:1", 2)


@pytest.mark.parametrize("make", [lambda i: gpufleet.Device(i), lambda i: gpufleet.Device("cuda", i),
                                  lambda i: gpufleet.Device(TorchLikeDevice("cuda", i))],
                         ids=["int", "type-and-index", "torch-like"])
def test_device_index_checks_are_the_same_on_every_path(make):
    # torch: "Device index must not be negative"; -1 is not "no index" (that is None)
    for bad in (-1, -(2**70)):
        with pytest.raises(ValueError, match="Device index must not be negative"):
            make(bad)
    for big in (2**30, 2**31, 2**64 + 5):  # a ValueError naming it, never a failed pybind conversion
        with pytest.raises(ValueError, match=f"invalid device index {big}"):
            make(big)
    with pytest.raises(TypeError, match="Device index must be an int or None"):
        gpufleet.Device("cuda", True)
    assert make(2**30 - 1).index == 2**30 - 1


# ---- CUDA_VISIBLE_DEVICES (REFERENCE.md cases) ---------------------------------------------------

UUIDS = ["GPU-8f2c1e00-1111", "GPU-8f2c1e00-2222", "GPU-a0b1c2d3-3333", "GPU-ffff0000-4444"]


@pytest.mark.parametrize(
    "value, expected",
    [
        (None, [0, 1, 2, 3]),          # unset: all
        ("", []),                      # empty: none
        ("2,1", [2, 1]),               # order as listed
        ("0,2,-1,1", [0, 2]),          # stops at the first invalid entry
        ("0,9,1", [0]),                # out of range is invalid
        ("1,1,0", [1]),                # a repeated device is invalid
        ("3,GPU-a0b1", [3, 2]),        # unique UUID prefix
        ("GPU-8f2c1e00,0", []),        # ambiguous prefix is invalid
        ("a0b1c2d3", []),              # UUIDs need the GPU- part
        ("GPU-ffff0000-4444,0", [3, 0]),
    ],
)
def test_parse_visible_devices_follows_cuda(value, expected):
    assert gpufleet.parse_visible_devices(value, UUIDS) == expected


def test_parse_visible_devices_with_counts_and_infos(sim_gpus):
    assert gpufleet.parse_visible_devices("3,0", 4) == [3, 0]
    infos = sim_gpus(3)
    assert gpufleet.parse_visible_devices(infos[2].uuid + ",0", infos) == [2, 0]
    with pytest.raises(ValueError, match="non-negative"):
        gpufleet.parse_visible_devices("0", -1)
    with pytest.raises(TypeError, match="string or None"):
        gpufleet.parse_visible_devices(0, 4)


def test_visible_devices_apply_to_simulated_topology(sim_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    sim_gpus(4)
    devs = gpufleet.devices()
    assert [d.nvml_index for d in devs] == [3, 1]
    assert [d.ordinal for d in devs] == [0, 1]
    assert gpufleet.device_count() == 2
    topo = gpufleet.topology()
    assert [g.ordinal for g in topo.gpus] == [-1, 1, -1, 0]


# ---- discovery ----------------------------------------------------------------------------------

def test_driverless_machine_reports_zero_devices_without_error(monkeypatch):
    monkeypatch.delenv("GPUFLEET_SIMULATED_GPUS", raising=False)
    topo = gpufleet.topology()
    if topo.source in ("nvml", "cuda"):
        pytest.skip("a real GPU is present: this checks the driverless path")
    assert gpufleet.device_count() == 0
    assert gpufleet.devices() == []
    assert not gpufleet.is_available()
    assert any("NVML not available" in n or "NVML disabled" in n for n in topo.notes), topo.notes


def test_build_flavour_matches_what_make_built():
    expected = os.environ.get("GPUFLEET_EXPECT_CUDA_BUILD")
    info = gpufleet.build_info()
    if expected not in ("0", "1"):
        pytest.skip("GPUFLEET_EXPECT_CUDA_BUILD not set (run through make test)")
    assert info["cuda"] is (expected == "1")
    if info["cuda"]:
        assert info["cuda_runtime_version"] >= 12000
        assert "90" in info["cuda_architectures"] and "75" in info["cuda_architectures"]
    else:
        assert info["cuda_architectures"] == [] and info["cuda_runtime_version"] is None


def test_simulated_fields_and_unknowns(sim_gpus, monkeypatch):
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    infos = sim_gpus([{"name": "Sim A100", "total_memory": "40GiB", "free_memory": "10GiB", "utilization": 55,
                       "processes": [{"pid": 4242, "used_memory": "30GiB"}], "compute_capability": "8.0"}, {}])
    a, b = infos
    assert (a.name, a.total_memory, a.free_memory, a.used_memory) == ("Sim A100", 40 << 30, 10 << 30, 30 << 30)
    assert a.utilization == 55 and a.compute_capability == (8, 0) and a.num_processes == 1
    assert a.processes[0].pid == 4242 and a.processes[0].used_memory == 30 << 30
    assert a.unknown_fields == [] and a.source == "simulated"
    assert b.free_memory == 80 << 30 and a.uuid != b.uuid and a.device == gpufleet.Device("cuda:0")


def test_fastest_first_orders_mixed_simulated_machines_like_cuda(sim_gpus, monkeypatch):
    spec = [{"name": "T4", "compute_capability": "7.5"}, {"name": "H100", "compute_capability": "9.0"}]
    monkeypatch.delenv("CUDA_DEVICE_ORDER", raising=False)
    assert [d.name for d in sim_gpus(spec)] == ["H100", "T4"]
    assert not gpufleet.topology().ordinal_order_exact
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
    assert [d.name for d in sim_gpus(spec)] == ["T4", "H100"]
    assert gpufleet.topology().ordinal_order_exact


@pytest.mark.parametrize(
    "spec, match",
    [
        ("four", "not a count or JSON"),
        ("-2", "expected 0 to 1024"),
        ([{"colour": "red"}], "unknown key 'colour'"),
        ([{"utilization": 101}], "0 to 100"),
        ([{"total_memory": "1GiB", "free_memory": "2GiB"}], "exceeds total_memory"),
        ([{"free_memory": "lots"}], "invalid memory size 'lots'"),
    ],
)
def test_bad_simulated_specs_are_rejected(spec, match):
    with pytest.raises(ValueError, match=match):
        gpufleet.simulate_gpus(spec)


def test_simulation_context_restores_previous_state(sim_gpus):
    sim_gpus(2)
    with gpufleet.simulate_gpus(5):
        assert gpufleet.device_count() == 5
    assert gpufleet.device_count() == 2


# ---- selection ----------------------------------------------------------------------------------

TOPO = [
    {"free_memory": "10GiB", "utilization": 50},
    {"free_memory": "40GiB", "utilization": 90},
    {"free_memory": "40GiB", "utilization": 10},
    {"free_memory": "5GiB", "utilization": 0},
]


def test_select_orders_and_breaks_ties_by_index(sim_gpus):
    sim_gpus(TOPO)
    assert [d.index for d in gpufleet.select_devices(4)] == [1, 2, 0, 3]
    assert [d.index for d in gpufleet.select_devices(4, order="utilization")] == [3, 2, 0, 1]
    assert [d.index for d in gpufleet.select_devices(2, order="index")] == [0, 1]
    assert gpufleet.select_devices(0) == []
    with pytest.raises(ValueError, match="invalid order 'speed'"):
        gpufleet.select_devices(order="speed")


def test_select_threshold_boundaries_are_inclusive(sim_gpus):
    sim_gpus(TOPO)
    # cuda:0 sits exactly on both thresholds (10 GiB free, 50 % busy) and qualifies.
    chosen = gpufleet.select_devices(2, min_free_memory=10 << 30, max_utilization=50)
    assert chosen == [gpufleet.Device("cuda:2"), gpufleet.Device("cuda:0")]
    assert gpufleet.select_devices(2, min_free_memory="40GiB") == [gpufleet.Device("cuda:1"), gpufleet.Device("cuda:2")]
    with pytest.raises(gpufleet.DeviceSelectionError, match="1 of 4"):
        gpufleet.select_devices(2, min_free_memory=(10 << 30) + 1, max_utilization=50)
    with pytest.raises(gpufleet.DeviceSelectionError, match="1 of 4"):
        gpufleet.select_devices(2, min_free_memory=10 << 30, max_utilization=49.5)


def test_select_all_busy_lists_every_device_and_why(sim_gpus):
    sim_gpus([{"utilization": 100}, {"utilization": 97}])
    with pytest.raises(gpufleet.DeviceSelectionError) as e:
        gpufleet.select_devices(max_utilization=20)
    msg = str(e.value)
    assert "0 of 2" in msg
    assert "cuda:0 (Simulated GPU, physical 0): 100% busy > 20% allowed" in msg
    assert "cuda:1 (Simulated GPU, physical 1): 97% busy > 20% allowed" in msg
    assert not isinstance(e.value, TimeoutError)


def test_select_more_than_exist(sim_gpus):
    sim_gpus(2)
    with pytest.raises(gpufleet.DeviceSelectionError, match="2 of 2 visible devices qualify, 3 needed"):
        gpufleet.select_devices(3)


def test_select_with_no_gpu_says_so(monkeypatch):
    monkeypatch.setenv("GPUFLEET_SIMULATED_GPUS", "0")
    with pytest.raises(gpufleet.DeviceSelectionError, match="no GPU is visible"):
        gpufleet.select_devices()


def test_select_exclude_and_argument_errors(sim_gpus):
    sim_gpus(3)
    assert [d.index for d in gpufleet.select_devices(3, exclude=[], order="index")] == [0, 1, 2]
    assert [d.index for d in gpufleet.select_devices(1, exclude=["cuda:0", 2], order="index")] == [1]
    with pytest.raises(ValueError, match="with an index"):
        gpufleet.select_devices(exclude=["cpu"])
    with pytest.raises(ValueError, match="invalid memory size '4 parsecs'"):
        gpufleet.select_devices(min_free_memory="4 parsecs")
    with pytest.raises(TypeError, match="min_free_memory"):
        gpufleet.select_devices(min_free_memory=4.5)
    with pytest.raises(ValueError, match="max_utilization must be a percentage"):
        gpufleet.select_devices(max_utilization=150)
    with pytest.raises(ValueError, match="non-negative number of devices"):
        gpufleet.select_devices(-1)
    with pytest.raises(ValueError, match="only applies with wait=True"):
        gpufleet.select_devices(timeout=1)


def test_select_waits_until_a_device_frees_up(sim_gpus):
    sim_gpus([{"free_memory": "1GiB", "utilization": 100}, {"free_memory": "2GiB", "utilization": 100}])

    def free_later():
        time.sleep(0.3)
        gpufleet.update_simulated_gpu(1, free_memory="60GiB", utilization=5)

    t = threading.Thread(target=free_later)
    t.start()
    start = time.monotonic()
    chosen = gpufleet.select_devices(min_free_memory="50GiB", wait=True, timeout=20, poll_interval=0.05)
    t.join()
    assert chosen == [gpufleet.Device("cuda:1")]
    assert time.monotonic() - start >= 0.25


def test_select_wait_times_out(sim_gpus):
    sim_gpus([{"free_memory": "1GiB"}])
    start = time.monotonic()
    with pytest.raises(gpufleet.DeviceSelectionTimeout) as e:
        gpufleet.select_devices(min_free_memory="50GiB", wait=True, timeout=0.3, poll_interval=0.05)
    assert time.monotonic() - start >= 0.3
    assert isinstance(e.value, TimeoutError) and isinstance(e.value, gpufleet.DeviceSelectionError)
    assert "gave up after waiting" in str(e.value)


# ---- seeding ------------------------------------------------------------------------------------

def test_manual_seed_reproduces_gpufleet_streams():
    gpufleet.manual_seed(1234)
    a = [_core.random_u64() for _ in range(3)]
    gpufleet.manual_seed(1234)
    assert [_core.random_u64() for _ in range(3)] == a
    assert gpufleet.initial_seed() == 1234 and len(set(a)) == 3
    gpufleet.manual_seed(-1)  # wraps like torch.manual_seed
    assert gpufleet.initial_seed() == 2**64 - 1
    with pytest.raises(TypeError):
        gpufleet.manual_seed("7")


def test_seed_everything_seeds_python_and_numpy(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "0")
    gpufleet.seed_everything(7)
    a = (random.random(), np.random.rand())
    gpufleet.seed_everything(7)
    assert (random.random(), np.random.rand()) == a
    assert os.environ["PYTHONHASHSEED"] == "7"


def test_memory_sizes():
    assert gpufleet.parse_memory_size("4GiB") == 4 << 30
    assert gpufleet.parse_memory_size("4GB") == 4 * 10**9
    assert gpufleet.parse_memory_size(123) == 123
    assert gpufleet.format_memory_size(80 << 30) == "80.0 GiB"
    for bad in ("", "-1G", "1.5", "4 parsecs"):
        with pytest.raises(ValueError, match="memory size"):
            gpufleet.parse_memory_size(bad)
