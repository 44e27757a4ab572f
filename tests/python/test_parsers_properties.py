"""Property-based tests (hypothesis) of the Python-side parsers against reference implementations
written here from the documented rules: memory sizes (exact decimal arithmetic with Fraction),
device strings and indices, CUDA_VISIBLE_DEVICES (CUDA's rules, /work/shared/REFERENCE.md), the
placeholders of product() (against the real GNU parallel), simulated topologies. Any
input either gives the reference's answer or a ValueError/TypeError, never another exception. The
C++ parsers are also fuzzed with libFuzzer (tests/fuzz)."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from fractions import Fraction

import pytest

import gpufleet

hypothesis = pytest.importorskip("hypothesis", reason="hypothesis is not installed (requirements/dev.txt)")
from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

# No example database (nothing written into the checkout), a bounded number of examples per test
# (the whole module runs in a few seconds), no deadline (the machine is shared).
settings.register_profile("gpufleet", database=None, max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("gpufleet")

U64_MAX = 2**64 - 1

# ---- memory sizes ---------------------------------------------------------------------------------

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "k": 2**10, "kib": 2**10,
          "m": 2**20, "mib": 2**20, "g": 2**30, "gib": 2**30, "t": 2**40, "tib": 2**40}


def reference_memory_size(text: str):
    """The documented grammar, with exact arithmetic: None when it must be refused."""
    m = re.fullmatch(r"\s*(\d*)(?:\.(\d*))?\s*([A-Za-z]*)\s*", text, flags=re.ASCII)
    if m is None or (not m.group(1) and not m.group(2)):
        return None
    whole, frac, unit = m.group(1), m.group(2) or "", m.group(3).lower()
    if unit not in _UNITS or not (whole or frac):
        return None
    scale = _UNITS[unit]
    value = (int(whole or "0") + Fraction(int(frac or "0"), 10 ** len(frac))) * scale
    if scale == 1 and value.denominator != 1:
        return None
    rounded = int(value) + (1 if value - int(value) >= Fraction(1, 2) else 0)
    return rounded if rounded <= U64_MAX else None


size_texts = st.builds(
    lambda ws1, whole, frac, ws2, unit, ws3: f"{ws1}{whole}{frac}{ws2}{unit}{ws3}",
    st.sampled_from(["", " ", "\t"]), st.text("0123456789", max_size=24),
    st.one_of(st.just(""), st.text("0123456789", max_size=30).map(lambda s: "." + s)),
    st.sampled_from(["", " "]),
    st.sampled_from(sorted(_UNITS) + ["KB", "GiB", "Tb", "eb", "pib", "x"]), st.sampled_from(["", " "]))


@given(size_texts)
def test_memory_sizes_match_exact_arithmetic(text):
    expected = reference_memory_size(text)
    if expected is None:
        with pytest.raises(ValueError):
            gpufleet.parse_memory_size(text)
    else:
        assert gpufleet.parse_memory_size(text) == expected


@given(st.text(max_size=40))
def test_any_text_is_a_size_or_a_value_error_naming_it(text):
    try:
        v = gpufleet.parse_memory_size(text)
    except ValueError as e:
        assert "memory size" in str(e)
        assert "\x00" not in str(e)
        return
    assert 0 <= v <= U64_MAX and v == reference_memory_size(text)


@given(st.integers(min_value=-2**70, max_value=2**70))
def test_int_sizes(n):
    if 0 <= n <= U64_MAX:
        assert gpufleet.parse_memory_size(n) == n
    else:
        with pytest.raises(ValueError, match=str(n)):
            gpufleet.parse_memory_size(n)


# ---- devices -------------------------------------------------------------------------------------------

@given(st.one_of(st.text(max_size=12), st.from_regex(r"\A(cpu|cuda)(:[0-9]{0,12})?\Z")))
def test_device_strings_round_trip_or_are_refused(text):
    valid = re.fullmatch(r"(cpu|cuda)(:(0|[1-9][0-9]{0,8}))?", text)
    if valid:
        d = gpufleet.Device(text)
        assert str(d) == text and gpufleet.Device(str(d)) == d
    else:
        with pytest.raises(ValueError) as info:
            gpufleet.Device(text)
        assert "Expected 'cpu'" in str(info.value)


@given(st.integers(min_value=-2**80, max_value=2**80))
def test_device_indices(n):
    if 0 <= n < 2**30:
        assert gpufleet.Device(n).index == n
    else:  # torch's wording for negatives, ours (naming the bound) for the too large
        with pytest.raises(ValueError, match="(?i)device index"):
            gpufleet.Device(n)


# ---- CUDA_VISIBLE_DEVICES ------------------------------------------------------------------------------

UUIDS = ["GPU-a0000000-aaaa", "GPU-a1000001-aaaa", "GPU-b2000002-aaaa", "GPU-c3000003-aaaa"]


def reference_visible(value, n):
    """CUDA's rules for ordinals and GPU-<uuid> prefixes: entries in order, the first invalid one
    (unknown, out of range, ambiguous, repeated) ends the enumeration."""
    if value is None:
        return list(range(n))
    out = []
    for entry in value.split(","):
        entry = entry.strip(" \t\n\r\f\v")
        gpu = None
        if re.fullmatch(r"[+-]?[0-9]+", entry, flags=re.ASCII):
            k = int(entry) if len(entry.lstrip("+-")) <= 9 else -1
            gpu = k if 0 <= k < n else None
        elif entry.startswith("GPU-"):
            hits = [i for i, u in enumerate(UUIDS[:n]) if u.startswith(entry)]
            gpu = hits[0] if len(hits) == 1 else None
        if gpu is None or gpu in out:
            break
        out.append(gpu)
    return out


entries = st.one_of(st.integers(min_value=-2, max_value=6).map(str), st.sampled_from(
    ["GPU-", "GPU-a", "GPU-a0", "GPU-a1000001-aaaa", "GPU-b", "GPU-c3000003-aaaa", "GPU-z", "", " 1", "+1", "01",
     "1 ", "x", "9999999999", "-0"]))


@given(st.one_of(st.none(), st.lists(entries, max_size=6).map(",".join)), st.integers(min_value=0, max_value=4))
def test_visible_devices_follow_cudas_rules(value, n):
    assert gpufleet.parse_visible_devices(value, UUIDS[:n]) == reference_visible(value, n)


# ---- placeholders (product(); the template code is being rewritten: public behaviour only) ------------

names = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1, max_size=30)
paths = st.lists(names, min_size=1, max_size=3).map("/".join)


_PLACEHOLDERS = ["{}", "{/}", "{//}", "{.}", "{/.}", "{#}", "x{}y"]


@pytest.fixture(scope="module")
def dump_argv(tmp_path_factory) -> str:
    """A program printing its arguments NUL-separated (exact: nothing to unquote)."""
    prog = tmp_path_factory.mktemp("argv") / "dump"
    prog.write_text("#!/bin/sh\nprintf '%s\\0' \"$@\"\n")
    prog.chmod(0o755)
    return str(prog)


def _gnu_parallel_argvs(dump: str, values: list[str]) -> list[list[str]]:
    """The real GNU parallel's argv of each job (NUL-separated input and output)."""
    r = subprocess.run(["parallel", "-0", "-k", "-j1", dump, *_PLACEHOLDERS, "::::", "-"],
                       input=b"".join(os.fsencode(v) + b"\0" for v in values), capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    fields = [os.fsdecode(f) for f in r.stdout.split(b"\0")[:-1]]
    n = len(_PLACEHOLDERS)
    return [fields[i:i + n] for i in range(0, len(fields), n)]


# The placeholders' rules are Perl's (GNU parallel's code), not os.path's: the real parallel is the
# reference; a batch of generated names per example keeps its start-up cost small.
@pytest.mark.skipif(shutil.which("parallel") is None, reason="needs GNU parallel (Debian: parallel)")
@settings(max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(values=st.lists(paths, min_size=1, max_size=12))
def test_product_placeholders_match_gnu_parallel(dump_argv, values):
    tasks = list(gpufleet.product([dump_argv, *_PLACEHOLDERS], values))
    assert [t.cmd[1:] for t in tasks] == _gnu_parallel_argvs(dump_argv, values)


@given(st.lists(paths, min_size=1, max_size=5, unique=True))
def test_input_text_is_never_expanded_twice(values):
    hostile = [v + "{}" if i % 2 else "{output}" + v for i, v in enumerate(values)]
    tasks = list(gpufleet.product(["cat", "{}"], hostile))
    assert [t.cmd for t in tasks] == [["cat", v] for v in hostile]


@given(st.lists(st.sampled_from(["a/x.txt", "b/x.txt", "a/y.txt", "c/x.md", "a/x.txt"]), min_size=1, max_size=4))
def test_colliding_output_templates_are_refused_up_front(values):
    base = {}
    for v in values:
        base.setdefault(os.path.splitext(os.path.basename(v))[0], set()).add(v)
    clash = len(values) != len(set(values)) or any(len(s) > 1 for s in base.values())
    if clash:
        with pytest.raises(ValueError, match="would both write"):
            gpufleet.product(["cp", "{}", "{output}"], values, output="/tmp/gf-prop-out/{/.}.txt")
    else:
        assert len(list(gpufleet.product(["cp", "{}", "{output}"], values, output="/tmp/gf-prop-out/{/.}.txt"))) == len(values)


@given(st.text(max_size=8))
def test_nul_in_a_command_is_refused_not_cut(word):
    if "\x00" in word:
        with pytest.raises(ValueError, match="NUL"):
            gpufleet.Task(["echo", word])
    else:
        assert gpufleet.Task(["echo", word]).cmd == ["echo", word]


# ---- simulated topologies ------------------------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers(min_value=-2**70, max_value=2**70)
                           | st.floats(allow_nan=False) | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                           max_leaves=8)
gpu_objects = st.dictionaries(st.sampled_from(["name", "total_memory", "free_memory", "utilization", "processes",
                                               "compute_capability", "uuid", "other"]),
                              st.one_of(json_values, st.sampled_from(["40GiB", "8.6", "GPU-1", 2**40])), max_size=4)


@given(st.one_of(st.lists(gpu_objects, max_size=3), json_values))
def test_simulated_specs_give_a_consistent_topology_or_a_value_error(spec):
    try:
        with gpufleet.simulate_gpus(json.dumps(spec)):
            gpus = gpufleet.devices()
    except ValueError as e:
        assert "\x00" not in str(e) and str(e)
        return
    for g in gpus:
        assert 0 <= g.free_memory <= g.total_memory <= U64_MAX
        assert g.used_memory == g.total_memory - g.free_memory
        assert g.compute_capability is None or all(0 <= c < 100 for c in g.compute_capability)
        assert g.processes is None or len(g.processes) <= 4096
