"""gpufleet.onnx.providers: the seed-001 provider order and options, validation against what an
onnxruntime build offers, and the documented result when onnxruntime is not installed."""
from __future__ import annotations

import subprocess
import sys
import os

import pytest

import gpufleet
from gpufleet import onnx as gonnx

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_cuda_device_order_and_options(tmp_path):
    cache = tmp_path / "trt" / "engines"
    p = gonnx.providers("cuda:3", cache_dir=cache, available=ALL)
    names = [x[0] if isinstance(x, tuple) else x for x in p]
    assert names == ALL
    trt, cuda = p[0][1], p[1][1]
    assert trt == {"device_id": 3, "trt_fp16_enable": True, "trt_max_workspace_size": 2 * 2**30,
                   "trt_engine_cache_enable": True, "trt_engine_cache_path": str(cache),
                   "trt_timing_cache_enable": True, "trt_timing_cache_path": str(cache)}
    assert cache.is_dir()
    assert cuda == {"device_id": 3, "arena_extend_strategy": "kNextPowerOfTwo",
                    "cudnn_conv_algo_search": "EXHAUSTIVE", "do_copy_in_default_stream": True}
    assert p.validated_against == ALL and p.dropped == []


def test_options_follow_arguments():
    p = gonnx.providers(gpufleet.Device("cuda", 1), tensorrt=False, gpu_mem_limit="10GiB",
                        cudnn_conv_algo_search="HEURISTIC", available=ALL)
    assert [x[0] if isinstance(x, tuple) else x for x in p] == ALL[1:]
    assert p[0][1]["gpu_mem_limit"] == 10 * 2**30 and p[0][1]["cudnn_conv_algo_search"] == "HEURISTIC"
    p = gonnx.providers(0, fp16=False, workspace="512MiB", available=ALL)
    assert p[0][1]["trt_fp16_enable"] is False and p[0][1]["trt_max_workspace_size"] == 512 * 2**20
    assert "trt_engine_cache_path" not in p[0][1]  # no cache_dir: no cache options
    assert gonnx.providers("cuda", available=ALL)[0][1]["device_id"] == 0
    assert gonnx.providers("cpu", available=ALL) == ["CPUExecutionProvider"]


def test_validation_drops_or_rejects_missing_providers():
    cpu_build = ["CPUExecutionProvider"]
    p = gonnx.providers("cuda:0", available=cpu_build)
    assert p == ["CPUExecutionProvider"]
    assert p.dropped == ["TensorrtExecutionProvider", "CUDAExecutionProvider"]
    with pytest.raises(ValueError, match=r"lacks the provider\(s\) \['TensorrtExecutionProvider', "
                                         r"'CUDAExecutionProvider'\].*available: \['CPUExecutionProvider'\]"):
        gonnx.providers("cuda:0", strict=True, available=cpu_build)
    gpu_build = ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert [x[0] if isinstance(x, tuple) else x for x in gonnx.providers("cuda:2", available=gpu_build)] == gpu_build
    with pytest.raises(ValueError, match="none of the providers"):
        gonnx.providers("cpu", available=["CUDAExecutionProvider"])


@pytest.mark.parametrize("kwargs, message", [
    ({"device": "gpu"}, "gpu"),
    ({"device": "cuda:0", "cudnn_conv_algo_search": "FAST"}, "cudnn_conv_algo_search must be"),
    ({"device": "cuda:0", "workspace": "lots"}, "lots"),
])
def test_bad_arguments(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        gonnx.providers(**kwargs, available=ALL)


def test_against_the_installed_onnxruntime_or_its_absence():
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    p = gonnx.providers("cuda:0")
    if onnxruntime is None:
        assert gonnx.available_providers() is None
        assert p.validated_against is None  # documented: unvalidated, the full list
        assert [x[0] if isinstance(x, tuple) else x for x in p] == ALL
    else:
        avail = onnxruntime.get_available_providers()
        assert p.validated_against == avail
        assert all((x[0] if isinstance(x, tuple) else x) in avail for x in p)


def test_missing_onnxruntime_in_a_fresh_interpreter():
    """With onnxruntime made unimportable, the module still imports and says it could not validate."""
    import gpufleet as gf

    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import gpufleet.onnx as o\n"
            "p = o.providers('cuda:1')\n"
            "print(o.available_providers(), p.validated_against, len(p))")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(os.path.dirname(gf.__file__)))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["None", "None", "3"]
