"""TRM training throughput: puzzles/s, peak memory and model FLOPs utilisation, eager vs torch.compile.

One *supervision step* is what TRM repeats up to N_sup times per batch: T - 1 recursions without gradient, one
with, the loss, backward and one AdamW step. This script times supervision steps of ``TRMModule``'s network (embedding,
recursion, stablemax loss with the halting term, AdamW) for the official sudoku size and a tiny one,
counts their FLOPs with ``torch.utils.flop_counter``, and relates them to an fp32 matrix multiply measured in the
same process (the machine's practical peak). Each setting runs in its own process so that peak memory
(max RSS on CPU, ``max_memory_allocated`` on GPU) is its own.

    python benchmarks/trm_throughput.py                    # CPU: official size (batch 8) and tiny (batch 64)
    python benchmarks/trm_throughput.py --compile          # also with torch.compile, and the speed-up ratio
    python benchmarks/trm_throughput.py --device cuda --batch-official 768 --batch-tiny 768
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

SIZES = {
    "official": dict(net=dict(hidden_size=512), n=6, T=3),  # 5,028,866 parameters
    "tiny": dict(net=dict(hidden_size=64, expansion=4.0, puzzle_emb_ndim=64), n=2, T=2),
}


def _gemm_flops_per_s(device: str, size: int = 2048, repeats: int = 5) -> float:
    import torch

    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(setting: dict) -> dict:
    """Run in a fresh process: time `steps` supervision steps of one configuration."""
    import resource

    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from reprozoo.methods.trm import TRMModule
    from reprozoo.nets import TinyRecursiveNetwork

    device, batch, steps = setting["device"], setting["batch"], setting["steps"]
    torch.manual_seed(0)
    size = dict(SIZES[setting["size"]])
    net = TinyRecursiveNetwork(**size.pop("net"))
    model = TRMModule(net, **size, n_sup=1, warmup_steps=1, halt_exploration_prob=0.0).to(device)
    if setting["compile"]:
        model.net.f = torch.compile(model.net.f)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=1.0)
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(2, 11, (batch, 81), generator=gen)
    inputs = torch.where(torch.rand(batch, 81, generator=gen) < 0.5, labels, torch.ones_like(labels))
    data = {
        "inputs": inputs.to(device),
        "labels": labels.to(device),
        "puzzle_identifiers": torch.zeros(batch, dtype=torch.long, device=device),
    }

    def step():
        x = model.net.embed(data["inputs"], data["puzzle_identifiers"])
        y, z = model.net.initial_state(batch)
        _, logits, q = model.net(x, y, z, model.hparams.n, model.hparams.T)
        loss = model.loss_fn(
            logits, data["labels"]
        ).mean() + 0.5 * torch.nn.functional.binary_cross_entropy_with_logits(q, torch.zeros_like(q))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(2):  # warm-up (and compilation)
        step()
    _sync(device)
    with FlopCounterMode(display=False) as counter:
        step()
    flops = counter.get_total_flops()
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.startswith("cuda")
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    gemm = _gemm_flops_per_s(device)
    return {
        **setting,
        "params": model.num_trainable_parameters(),
        "step_s": seconds,
        "puzzles_per_s": batch / seconds,
        "flops_per_step": flops,
        "model_flops_per_s": flops / seconds,
        "gemm_flops_per_s": gemm,
        "mfu": flops / seconds / gemm,
        "peak_mib": peak,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-official", type=int, default=8)
    parser.add_argument("--batch-tiny", type=int, default=64)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(measure(json.loads(args.worker))))
        return

    settings = [
        {"size": size, "batch": batch, "compile": compiled, "device": args.device, "steps": args.steps}
        for size, batch in (("official", args.batch_official), ("tiny", args.batch_tiny))
        for compiled in ((False, True) if args.compile else (False,))
    ]
    results = []
    for setting in settings:
        done = subprocess.run(
            [sys.executable, __file__, "--worker", json.dumps(setting)], capture_output=True, text=True
        )
        if done.returncode != 0:
            print(done.stderr[-2000:], file=sys.stderr)
            raise SystemExit(f"benchmark worker failed for {setting}")
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    print(f"\nTRM supervision steps on {args.device} (T-1 no-grad recursions + 1 with grad, backward, AdamW)\n")
    print(
        "| size | params | batch | compile | s/step | puzzles/s | GFLOP/step | GFLOP/s | fp32 GEMM GFLOP/s | MFU | peak MiB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['size']} | {r['params']:,} | {r['batch']} | {'yes' if r['compile'] else 'no'} | {r['step_s']:.3f} | "
            f"{r['puzzles_per_s']:.1f} | {r['flops_per_step'] / 1e9:.1f} | {r['model_flops_per_s'] / 1e9:.1f} | "
            f"{r['gemm_flops_per_s'] / 1e9:.1f} | {r['mfu']:.1%} | {r['peak_mib']:.0f} |"
        )
    if args.compile:
        for size in SIZES:
            eager = next(r for r in results if r["size"] == size and not r["compile"])
            compiled = next(r for r in results if r["size"] == size and r["compile"])
            print(f"\ntorch.compile speed-up, {size}: {eager['step_s'] / compiled['step_s']:.2f}x")


if __name__ == "__main__":
    main()
