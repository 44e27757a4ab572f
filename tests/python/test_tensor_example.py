"""examples/device_basics.py (seed 004 the gpufleet way) runs on a machine without a GPU and shows
what it claims."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "device_basics.py"


def test_device_basics_example_runs_and_tells_the_story():
    out = subprocess.run([sys.executable, str(EXAMPLE)], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "net.to(...) returns the same module: True; its weights were replaced in place: True" in text
    assert "x_cpu.to(float64) is x_cpu: False" in text
    assert "DataParallel's rule: 5 over 4 devices gives [2, 2, 1]" in text
    assert "model outputs.size: (16, 3)" in text and "same as one big batch: True" in text
    assert 'Unexpected key(s) in state_dict: "module.linears.0.weight"' in text
    assert "after strip_prefix: missing=[] unexpected=[]" in text
    assert "most free memory first: ['cuda:1', 'cuda:3', 'cuda:2', 'cuda:0']" in text
    assert out.stderr == ""
