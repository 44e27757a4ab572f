"""The parsers users feed by hand (memory sizes, simulated topologies, device strings and indices) on
hostile input: every bad value is a ValueError (or TypeError) whose message names the value, whole
(NUL bytes and undecodable bytes shown escaped, never cut) and says what is accepted; every good
value comes back exact. Property-based checks against Python reference implementations are in
test_parsers_properties.py."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import gpufleet

U64_MAX = 2**64 - 1


# ---- memory sizes (issue 12, item 9) --------------------------------------------------------------

@pytest.mark.parametrize("text, exact", [
    ("10000000TB", 10**19),                        # between 2**63 and 2**64: came back as 2**63
    ("18446744073709551615", U64_MAX),             # the largest byte count
    ("9223372036854775809", 2**63 + 1),            # needs all 64 bits, exactly (no double rounding)
    ("16777217", 16777217),
    ("0.5KiB", 512),
    ("1.5G", 3 << 29),
    ("000000000000000000000000000000000000004GiB", 4 << 30),  # long but small: no stod overflow
    ("2.000000000000000000000000000000000000000", 2),        # a whole number written with zeros
    ("15.999999999999999999999999999TiB", 16 << 40),          # rounded to the nearest byte
])
def test_memory_sizes_are_exact_up_to_64_bits(text, exact):
    assert gpufleet.parse_memory_size(text) == exact


@pytest.mark.parametrize("text, why", [
    ("18446744073709551616", "too large"),          # 2**64
    ("16EiB", "unknown unit"),
    ("17TB" + "0" * 10, "unknown unit"),
    ("1" * 400, "too large"),                       # IndexError: stod
    ("1" * 400 + ".5GB", "too large"),
    (".9999999999999999999", "whole number"),       # accepted as 1 byte
    ("0.5", "whole number"),
    ("20000000TB", "too large"),
])
def test_bad_memory_sizes_are_value_errors_naming_the_text(text, why):
    with pytest.raises(ValueError) as info:
        gpufleet.parse_memory_size(text)
    msg = str(info.value)
    assert why in msg and (text if len(text) < 100 else text[:60]) in msg
    assert "expected" in msg or "at most" in msg


def test_memory_size_ints_beyond_64_bits_are_refused():
    assert gpufleet.parse_memory_size(U64_MAX) == U64_MAX
    with pytest.raises(ValueError, match=r"18446744073709551616.*at most 18446744073709551615"):
        gpufleet.parse_memory_size(2**64)
    with pytest.raises(ValueError, match="min_free_memory"):
        gpufleet.Task(["true"], min_free_memory=2**70)


def test_messages_keep_nul_and_undecodable_bytes_visible():
    with pytest.raises(ValueError) as info:
        gpufleet.parse_memory_size("4\0GB")
    assert "'4\\x00GB'" in str(info.value) and "expected" in str(info.value)  # was cut at the NUL
    with pytest.raises(ValueError) as info:
        gpufleet.Device("cu\0da:1")
    assert "'cu\\x00da:1'" in str(info.value) and "Expected" in str(info.value)
    with pytest.raises(ValueError) as info:
        gpufleet.parse_memory_size("4\udcffGB")  # a non-UTF-8 byte (surrogateescape) reaches the core as such
    assert "\\xff" in str(info.value)


# ---- simulated topologies and devices (issue 12, item 10) ------------------------------------------

@pytest.mark.parametrize("spec, words", [
    ([{"compute_capability": "99999999999.0"}], ["compute_capability", "99999999999.0"]),  # IndexError: stoi
    ([{"compute_capability": "9.0abc"}], ["compute_capability", "9.0abc"]),                # read as 9.0
    ([{"compute_capability": "9.99999999999"}], ["compute_capability"]),
    ([{"total_memory": 1e30}], ["total_memory", "1e+30"]),                                 # read as 0
    ([{"total_memory": 1.5}], ["total_memory", "1.5"]),
    ([{"total_memory": -1}], ["total_memory", "-1"]),
    ([{"processes": [{"pid": -1}]}], ["pid", "-1"]),                                       # read as 4294967295
    ([{"processes": [{"pid": 2**32}]}], ["pid", str(2**32)]),
    ([{"processes": 10**12}], ["processes", str(10**12)]),                                 # a trillion records
    ([{"name": "x", "bad\u0000key": 1}], ["bad\\x00key"]),
])
def test_bad_simulated_specs_are_value_errors_naming_the_value(spec, words):
    with pytest.raises(ValueError) as info:
        gpufleet.simulate_gpus(json.dumps(spec))
    for w in words:
        assert w in str(info.value)


def test_undecodable_spec_text_is_a_readable_value_error():
    with pytest.raises(ValueError) as info:
        gpufleet.simulate_gpus("é")  # the JSON error quoted half a UTF-8 sequence: UnicodeDecodeError
    assert "invalid simulated GPU spec 'é'" in str(info.value)


def test_gpufleet_info_reports_a_bad_spec_without_a_traceback():
    env = dict(os.environ, GPUFLEET_SIMULATED_GPUS='[{"compute_capability": "99999999999.0"}]')
    env["PYTHONPATH"] = os.path.dirname(os.path.dirname(gpufleet.__file__))
    r = subprocess.run([sys.executable, "-m", "gpufleet", "info"], env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr and "compute_capability" in r.stderr and "99999999999.0" in r.stderr


@pytest.mark.parametrize("make", [
    lambda: gpufleet.Device(2**63),
    lambda: gpufleet.Device(2**30),
    lambda: gpufleet.Device("cuda", 2**63),
    lambda: gpufleet.as_device(type("D", (), {"type": "cuda", "index": 2**40})()),
])
def test_huge_device_indices_are_value_errors(make):
    with pytest.raises(ValueError, match=r"device index \d+.*non-negative integer below 1073741824"):
        make()


# ---- CUDA_VISIBLE_DEVICES (found by tests/fuzz/fuzz_visible_devices) ------------------------------------

@pytest.mark.parametrize("value, visible", [
    ("MIG-GPU-00000000/&24,0", []),        # a legacy MIG entry without <gi>/<ci>: invalid, stops
    ("MIG-GPU-00000000/1/x,0", []),
    ("MIG-GPU-00000000/1/0,0", [0]),       # the GPU as a MIG instance, then whole: counted once
    ("0,MIG-GPU-00000000/1/0", [0]),
])
def test_a_gpu_is_never_visible_twice(value, visible):
    uuids = ["GPU-00000000-0000-4000-8000-000000000000", "GPU-11111111-0000-4000-8000-000000000001"]
    assert gpufleet.parse_visible_devices(value, uuids) == visible
