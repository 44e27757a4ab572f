"""A torchrun-style script for `gpufleet launch` tests: records its environment; rank 1 fails on the
first attempt when FAIL_FIRST is set (a restart must then succeed); FAIL_ALWAYS makes rank 1 fail."""
import json
import os
import sys
import time

out = os.environ["OUT_DIR"]
keys = ["RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT",
        "TORCHELASTIC_RESTART_COUNT", "CUDA_VISIBLE_DEVICES"]
rec = {k: os.environ.get(k) for k in keys}
rec["argv"] = sys.argv[1:]
rec["pid"] = os.getpid()
attempt = os.environ["TORCHELASTIC_RESTART_COUNT"]
with open(os.path.join(out, f"a{attempt}-r{os.environ['RANK']}.json"), "w") as f:
    json.dump(rec, f)
print(f"rank {os.environ['RANK']} says hello", flush=True)
print(f"rank {os.environ['RANK']} warns on stderr", file=sys.stderr, flush=True)
sys.stdout.write(f"rank {os.environ['RANK']} ends without a newline")
sys.stdout.flush()
if os.environ["RANK"] == "1" and (os.environ.get("FAIL_ALWAYS") or (os.environ.get("FAIL_FIRST") and attempt == "0")):
    time.sleep(0.2)
    raise SystemExit("rank 1 lost its data loader")
time.sleep(float(os.environ.get("SLEEP", "0.5")) if os.environ["RANK"] != "1" else 0.1)
