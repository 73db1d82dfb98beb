"""Cost of head and neuron synchronisation sums (issue 5) on a GPT-2-small-shaped model.

Times, on the same random tokens, a plain forward and ``collect`` with a single late site (the baseline pass),
with ``head_sync``, ``neuron_sync`` and both, all 12 layers; reports the bytes of the streamed totals and the
time of the analyses (``head_sync`` / ``neuron_sync``, blocks, dof, a default τ sweep) for one layer.
Needs TransformerLens 4.x (``TransformerBridge.boot_native``, random weights, no download).

    python benchmarks/bench_sync.py                         # CPU, 4 x 128 tokens
    python benchmarks/bench_sync.py --rows 16 --device cuda
"""

from __future__ import annotations

import argparse
import platform
import resource
import statistics
import time

import torch

import tl_degeneracy as tld
from tl_degeneracy.analysis.sync import head_sync, neuron_sync


def gpt2_small_native(device: str):
    from transformer_lens.config import TransformerBridgeConfig
    from transformer_lens.model_bridge import TransformerBridge

    cfg = TransformerBridgeConfig(d_model=768, n_layers=12, n_ctx=1024, d_head=64, n_heads=12, d_mlp=3072,
                                  d_vocab=50257, act_fn="gelu_new", normalization_type="LN", seed=0)
    return TransformerBridge.boot_native(cfg).eval().to(device)


def timed(fn, repeats: int, device: str) -> float:
    """Smallest wall time of ``repeats`` runs (the machine is shared; the minimum is the least disturbed)."""
    times = []
    for _ in range(repeats):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return min(times)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layer", type=int, default=5, help="layer whose analyses are timed")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    model = gpt2_small_native(args.device)
    tokens = torch.randint(0, 50257, (args.rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    data = tld.token_batches(model, tokens, batch_size=args.batch_size)
    n = data.n_counted
    site = "blocks.11.hook_resid_post"

    def forward() -> None:
        with torch.no_grad():
            for batch in data:
                model(batch.tokens.to(args.device))

    def run(**kw) -> tld.Stats:
        return tld.collect(model, data, sites=site, progress=False, memory_budget=None, **kw)

    configs = {
        "forward (model(tokens), no hooks)": forward,
        "collect, one site (baseline pass)": lambda: run(),
        "collect + head_sync": lambda: run(head_sync=True),
        "collect + neuron_sync": lambda: run(neuron_sync=True),
        "collect + head_sync + neuron_sync": lambda: run(head_sync=True, neuron_sync=True),
    }
    forward()  # warm up
    seconds = {name: timed(fn, args.repeats, args.device) for name, fn in configs.items()}
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else (
        f"CPU {platform.machine()}, {torch.get_num_threads()} threads")
    print(f"device: {device}; torch {torch.__version__}; {args.rows} x {args.seq_len} tokens, batch size "
          f"{args.batch_size}, {n} counted; min of {args.repeats} runs\n")
    base = seconds["forward (model(tokens), no hooks)"]
    print("| pass | s | ms / 1k tokens | × forward |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {s:.2f} | {1e6 * s / n:.0f} | {s / base:.2f} |")

    stats = run(head_sync=True, neuron_sync=True)
    sizes = {prefix: sum(v.numel() * v.element_size() for k, v in stats.tensors.items() if k.startswith(prefix))
             for prefix in ("hsync/", "nsync/")}
    print(f"\nfloat64 totals, all 12 layers: head sums {sizes['hsync/'] / 2**20:.1f} MiB, "
          f"neuron sums {sizes['nsync/'] / 2**30:.3f} GiB; peak RSS of this process "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (model included)")

    layer = args.layer
    rows = []
    t = time.perf_counter()
    ns = neuron_sync(stats, layer)
    rows.append(("neuron_sync(stats, layer)", time.perf_counter() - t))
    tau = statistics.median(ns.normalized_distance[ns.normalized_distance > 0].tolist())
    t = time.perf_counter()
    blocks = ns.blocks(tau, measure="normalized_distance")
    rows.append((f"NeuronSync.blocks (first call builds the spanning tree) -> {len(blocks)} blocks",
                 time.perf_counter() - t))
    t = time.perf_counter()
    ns.dof(tau, measure="normalized_distance")
    rows.append(("NeuronSync.dof at the median distance", time.perf_counter() - t))
    t = time.perf_counter()
    sw = ns.sweep(measure="normalized_distance")
    rows.append((f"NeuronSync.sweep, {len(sw.taus)} thresholds, with dof", time.perf_counter() - t))
    t = time.perf_counter()
    hs = head_sync(stats, layer)
    hs.sweep()
    rows.append(("head_sync(stats, layer) + sweep", time.perf_counter() - t))
    print(f"\nanalyses of layer {layer}:\n\n| analysis | s |\n|---|---|")
    for name, s in rows:
        print(f"| {name} | {s:.2f} |")


if __name__ == "__main__":
    main()
