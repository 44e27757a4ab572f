"""Seed 004 ("PyTorch device basics") done the gpufleet way; runs with or without a GPU.

The seed script: picks `cuda:0 if available else cpu`, shows that `tensor.to` returns a new tensor
while `module.to` moves in place, queries torch.cuda, sets CUDA_VISIBLE_DEVICES from `nvidia-smi |
grep Free` output sorted by free memory, runs a DataParallel FooNet (3 linear layers) on a batch of
16, and strips the `module.` prefix that DataParallel puts on state-dict keys. Here every step uses
gpufleet: no nvidia-smi parsing, no hand-written prefix loop, and the same code runs on a laptop.

    PYTHONPATH=build/cuda/stage python examples/device_basics.py
"""
from __future__ import annotations

import numpy as np

import gpufleet


def real_gpus() -> list[gpufleet.Device]:
    """The CUDA devices this process can really use (a simulated topology does not count)."""
    if not gpufleet.build_info()["cuda"] or gpufleet.topology().source in ("none", "simulated"):
        return []
    return [gpufleet.Device("cuda", d.ordinal) for d in gpufleet.devices()]


class FooNet(gpufleet.Module):
    """The seed's FooNet: `layers` bias-free linear layers with ReLU, weights as named tensors."""

    def __init__(self, neural_num: int, layers: int = 3):
        super().__init__()
        self.linears = gpufleet.Module()
        rng = np.random.default_rng(0)
        for i in range(layers):
            layer = gpufleet.Module()
            layer.weight = gpufleet.tensor(rng.standard_normal((neural_num, neural_num)) / np.sqrt(neural_num),
                                           dtype="float32")
            self.linears.add_module(str(i), layer)

    def forward(self, x: gpufleet.Tensor) -> gpufleet.Tensor:
        print(f"    batch size in forward: {x.shape[0]} on {x.device}")
        # gpufleet has no matmul of its own: compute on the host with NumPy (zero-copy views) and
        # put the result back on the input's device.
        h = x.cpu().numpy()
        for _, w in self.linears.named_tensors():
            h = np.maximum(h @ w.cpu().numpy().T, 0)
        return gpufleet.from_numpy(h).to(x.device)


def main() -> None:
    gpus = real_gpus()
    print("== 1. devices")
    print(f"gpufleet {gpufleet.__version__}, CUDA compiled in: {gpufleet.build_info()['cuda']}, "
          f"visible GPUs: {gpufleet.device_count()}")
    device = gpus[0] if gpus else gpufleet.Device("cpu")
    print(f"device = {device!r}   # 'cuda:0' if a GPU is usable, else 'cpu'")
    print(f"'cuda' without an index means the current device: {gpufleet.current_device()}")

    print("\n== 2. tensor.to returns a new tensor; module.to moves in place")
    x_cpu = gpufleet.ones(3, 3)
    x_dev = x_cpu.to(device)
    print(f"x_cpu: device={x_cpu.device} id={id(x_cpu)}")
    print(f"x_dev: device={x_dev.device} id={id(x_dev)}  (same object: {x_dev is x_cpu}: "
          f"{'nothing to move on a CPU-only machine' if x_dev is x_cpu else 'a copy on the GPU'})")
    x64 = x_cpu.to(gpufleet.float64)
    print(f"x_cpu.to(float64) is x_cpu: {x64 is x_cpu}   (dtype changed: always a new tensor)")
    net = FooNet(neural_num=3)
    before = id(net)
    w_before = net.linears._modules["0"].weight
    moved = net.to(device, gpufleet.float64)
    print(f"net.to(...) returns the same module: {moved is net and id(net) == before}; its weights were "
          f"replaced in place: {net.linears._modules['0'].weight is not w_before} "
          f"(now {net.linears._modules['0'].weight.dtype} on {net.linears._modules['0'].weight.device})")
    net.to(gpufleet.float32)

    print("\n== 3. queries and seeding (torch.cuda.device_count/get_device_name/manual_seed_all)")
    for info in gpufleet.devices():
        print(f"  cuda:{info.ordinal} {info.name} free={gpufleet.format_memory_size(info.free_memory or 0)}")
    if not gpufleet.devices():
        print("  (no GPU visible)")
    gpufleet.seed_everything(42)
    print(f"seed_everything(42): NumPy draws {np.random.rand():.6f}, gpufleet initial_seed={gpufleet.initial_seed()}")

    print("\n== 4. physical vs logical GPUs, and the GPU with the most free memory")
    print("CUDA_VISIBLE_DEVICES='2,3' on 4 GPUs makes physical", gpufleet.parse_visible_devices("2,3", 4),
          "visible as cuda:0, cuda:1")
    with gpufleet.simulate_gpus([{"free_memory": "10GiB"}, {"free_memory": "70GiB"},
                                 {"free_memory": "35GiB", "utilization": 80}, {"free_memory": "50GiB"}]):
        order = gpufleet.select_devices(4, order="free_memory")
        print("simulated 4-GPU box, most free memory first:", [str(d) for d in order],
              "  (replaces `nvidia-smi -q -d Memory | grep Free` + argsort)")
        print("the best idle one:", gpufleet.select_devices(1, max_utilization=50)[0])

    print("\n== 5. DataParallel: scatter a batch of 16, run each chunk, gather on the first device")
    replicas = gpus if len(gpus) > 1 else [device, device]  # two CPU 'replicas' without GPUs
    inputs = gpufleet.tensor(np.random.default_rng(1).standard_normal((16, 3)), dtype="float32")
    chunks = gpufleet.scatter(inputs, replicas)
    print(f"chunk sizes over {len(replicas)} devices: {[c.shape[0] for c in chunks]}  "
          f"(DataParallel's rule: 5 over 4 devices gives {gpufleet.chunk_sizes(5, 4)})")
    nets = [net] + [FooNet(3).to(d) for d in replicas[1:]]
    for replica in nets[1:]:
        replica.load_state_dict(net.state_dict())
    outputs = [n.forward(c) for n, c in zip(nets, chunks)]
    out = gpufleet.gather(outputs, replicas[0])
    print(f"model outputs.size: {out.shape} on {out.device}")
    single = net.forward(inputs.to(replicas[0]))
    print(f"same as one big batch: {np.allclose(out.cpu().numpy(), single.cpu().numpy(), atol=1e-6)}")

    print("\n== 6. the DataParallel 'module.' prefix in state dicts")
    saved = gpufleet.add_prefix(net.state_dict(), "module.")  # what a DataParallel checkpoint looks like
    print("checkpoint keys:", list(saved)[:2], "...")
    fresh = FooNet(3)
    try:
        fresh.load_state_dict(saved)
    except gpufleet.StateDictError as e:
        print("load_state_dict(saved) fails clearly:\n   ", str(e).replace("\n", "\n    "))
    # map_location='cpu': bring every tensor to the host before loading
    on_host = {k: v.to("cpu") for k, v in gpufleet.strip_prefix(saved, "module.").items()}
    result = fresh.load_state_dict(on_host)
    print(f"after strip_prefix: missing={result.missing_keys} unexpected={result.unexpected_keys}")


if __name__ == "__main__":
    main()
