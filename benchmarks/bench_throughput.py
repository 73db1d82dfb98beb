"""End-to-end throughput of `collect` on a GPT-2-shaped model (issue 9).

Activation + KL-Jacobian statistics at every resid_pre and mlp_post site (24 sites for GPT-2 small), plus head
and neuron synchronisation, for K = 1 and K = 4 probes, in accurate and fast precision. Reports tokens/s,
peak memory, achieved TFLOP/s against the cost model (benchmarks/common.py, ECOSYSTEM §5), and the fast
mode's error against the accurate mode on the same tokens. With --size xl it prints and runs the memory plan.

    python benchmarks/bench_throughput.py --device cuda --size small --n-tokens 262144
    python benchmarks/bench_throughput.py --device cpu --size small --n-tokens 512 --batch-size 2   # CPU

``--ratio`` (issue 21) instead measures, side by side in one run with interleaved repeats, ``collect`` (KL
Jacobian, K = ``--probes``, no sync) against a forward plus one activation backward of the same model on the
same tokens (the backward from the logits to the residual stream before layer 0, frozen weights: the floor a
Jacobian pass cannot beat), prints the median ratio, the achieved TFLOP/s against the cost model, and the
per-operator CPU times of one collect call from ``torch.profiler``:

    python benchmarks/bench_throughput.py --ratio --device cpu --n-layer 2 --n-tokens 1016 --threads 1
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

import torch
from common import cost_model, device_name, gpt2_shaped_model, record

import tl_degeneracy as tld
from tl_degeneracy.adapter import ModelShape
from tl_degeneracy.collection.memory import plan_memory
from tl_degeneracy.sites import site_dim

HERE = Path(__file__).resolve().parent


def peak_bytes(device: str) -> int:
    """CUDA: peak allocated during the timed run. CPU: the process's peak resident set so far (it cannot be
    reset, so later rows include earlier ones; run one configuration per process for a clean figure)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="small", choices=["small", "medium", "large", "xl"])
    p.add_argument("--n-tokens", type=int, default=4096)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--probes", default="1,4")
    p.add_argument("--precisions", default="accurate,fast")
    p.add_argument("--no-sync", action="store_true", help="leave out head and neuron synchronisation")
    p.add_argument("--memory-budget", type=float, default=None, help="bytes; default: the device's free memory")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(HERE / "results.jsonl"))
    p.add_argument("--ratio", action="store_true", help="collect against forward + one activation backward")
    p.add_argument("--n-layer", type=int, default=None, help="override the depth (with --ratio)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats (with --ratio)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.ratio:
        ratio_run(args)
        return

    model = gpt2_shaped_model(args.size, device=args.device)
    shape = ModelShape.of(model)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    sync = not args.no_sync
    cost = cost_model(shape, seq_len=args.seq_len, site_dims=[site_dim(model, s) for s in sites], jacobian=True)
    if sync:  # head sync: a few [T x T] products per head; neuron sync: three d_mlp^2 products per token
        cost.grams += shape.n_layers * (3 * 2 * (shape.d_mlp or 0) ** 2 + 4 * shape.n_heads * args.seq_len)
    budget = args.memory_budget if args.memory_budget is not None else "auto"
    plan = plan_memory(model, sites, batch_size=args.batch_size, seq_len=args.seq_len, jacobian=True,
                       head_sync_layers=range(shape.n_layers) if sync else (),
                       neuron_sync_layers=range(shape.n_layers) if sync else (),
                       budget_bytes=None if budget == "auto" and args.device == "cpu" else
                       (torch.cuda.mem_get_info()[0] if budget == "auto" else budget))
    print(plan.describe())
    warm = tld.token_batches(model, torch.randint(0, shape.d_vocab, (args.batch_size, args.seq_len)),
                             batch_size=args.batch_size)
    tokens = torch.randint(0, shape.d_vocab, (-(-args.n_tokens // (args.seq_len - 1)), args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    data = tld.token_batches(model, tokens, batch_size=args.batch_size, n_tokens=args.n_tokens)
    print(f"device: {device_name(args.device)}; model: GPT-2-{args.size}-shaped ({shape}); {len(sites)} sites; "
          f"{data.n_counted} counted tokens; sync={sync}")
    print("| precision | K | tokens/s | peak GiB | achieved TFLOP/s | cost-model GFLOP/token | passes |")
    print("|---|---|---|---|---|---|---|")
    results = {}
    for precision in args.precisions.split(","):
        for k in [int(x) for x in args.probes.split(",")]:
            kw = dict(sites=sites, jacobian="kl", n_probes=k, head_sync=sync, neuron_sync=sync,
                      precision=precision, memory_budget=budget, progress=False)
            tld.collect(model, warm, **kw)  # warm-up: allocator, kernels
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            stats = tld.collect(model, data, **kw)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            tps = data.n_counted / dt
            flops = cost.total(k)
            row = dict(bench="throughput", device=device_name(args.device), size=args.size, precision=precision,
                       n_probes=k, tokens=data.n_counted, seconds=dt, tokens_per_s=tps,
                       peak_gib=peak_bytes(args.device) / 1024**3, tflops=tps * flops / 1e12,
                       gflop_per_token=flops / 1e9, passes=stats.meta["memory_plan"]["n_passes"],
                       sync=sync, command=" ".join(sys.argv))
            # keep G and M of every sixth site for the fast-vs-accurate comparison, not the whole Stats
            results[(precision, k)] = {s: (stats.gram(s), stats.jacobian_gram(s)) for s in sites[::6]}
            del stats
            print(f"| {precision} | {k} | {tps:,.0f} | {row['peak_gib']:.2f} | {row['tflops']:.2f} | "
                  f"{flops / 1e9:.3f} | {row['passes']} |")
            record(Path(args.out), row)
    for k in [int(x) for x in args.probes.split(",")]:
        if ("accurate", k) in results and ("fast", k) in results:
            acc, fast = results[("accurate", k)], results[("fast", k)]
            g = max(relative_error(fast[s][0], acc[s][0]) for s in acc)
            m = max(relative_error(fast[s][1], acc[s][1]) for s in acc)
            print(f"fast vs accurate, K={k}: max relative Frobenius error of G {g:.2e}, of M {m:.2e} "
                  "(M includes probe-sampling differences where bf16 changes a sampled token)")
            record(Path(args.out), dict(bench="fast_vs_accurate", device=device_name(args.device), n_probes=k,
                                        rel_err_G=g, rel_err_M=m, command=" ".join(sys.argv)))


def reference_pass(model, data) -> None:
    """A forward plus one backward from the logits to the residual stream before layer 0 (random cotangent),
    with the weights frozen: no weight gradient, like the Jacobian pass."""
    from tl_degeneracy.adapter import as_adapter

    adapter = as_adapter(model)
    gen = torch.Generator(device=adapter.device).manual_seed(0)
    with adapter.eval_mode(), adapter.frozen_parameters():
        for batch in data:
            held = {}

            def cut(act, hook, held=held):
                held["leaf"] = act.detach().requires_grad_(True)
                return held["leaf"]

            with adapter.hooks(fwd_hooks=[("blocks.0.hook_resid_pre", cut)]):
                logits = adapter.forward(batch.tokens.to(adapter.device))
                u = torch.randn(logits.shape, generator=gen, device=logits.device, dtype=logits.dtype)
                torch.autograd.grad(logits, held.pop("leaf"), u)
            del logits, u


def ratio_run(args) -> None:
    import statistics

    from torch.profiler import ProfilerActivity, profile

    model = gpt2_shaped_model(args.size, device=args.device, n_layer=args.n_layer)
    shape = ModelShape.of(model)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    k = int(args.probes.split(",")[0])
    tokens = torch.randint(0, shape.d_vocab, (-(-args.n_tokens // (args.seq_len - 1)), args.seq_len),
                           generator=torch.Generator().manual_seed(0))
    data = tld.token_batches(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size,
                             n_tokens=args.n_tokens)
    cost = cost_model(shape, seq_len=args.seq_len, site_dims=[site_dim(model, s) for s in sites], jacobian=True)
    kw = dict(sites=sites, jacobian="kl", n_probes=k, precision=args.precisions.split(",")[0],
              memory_budget=None, progress=False)

    def timed(fn) -> float:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(lambda: reference_pass(model, data))  # warm-ups of both sides (first-call costs)
    timed(lambda: tld.collect(model, data, **kw))
    ours, ref = [], []
    for _ in range(args.repeats):
        ours.append(timed(lambda: tld.collect(model, data, **kw)))
        ref.append(timed(lambda: reference_pass(model, data)))
    ratios = [a / b for a, b in zip(ours, ref, strict=True)]
    t = statistics.median(ours)
    tps = data.n_counted / t
    print(f"device: {device_name(args.device)}; GPT-2-{args.size}-shaped, {shape.n_layers} layers; {len(sites)} "
          f"sites; KL, K={k}; {data.n_counted} counted tokens; {args.repeats} interleaved repeats")
    print("| collect s (median) | forward+backward s (median) | ratio (median; all) | tokens/s | "
          "achieved TFLOP/s | cost-model ratio |")
    print("|---|---|---|---|---|---|")
    model_ratio = cost.total(k) / (2 * cost.forward)
    print(f"| {t:.2f} | {statistics.median(ref):.2f} | {statistics.median(ratios):.2f}; "
          f"{', '.join(f'{r:.2f}' for r in ratios)} | {tps:,.0f} | {tps * cost.total(k) / 1e12:.3f} | "
          f"{model_ratio:.2f} |")
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device != "cpu" else [])) \
            as prof:
        tld.collect(model, data, **kw)
    print("\nper-operator self CPU time of one collect call (torch.profiler):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    record(Path(args.out), dict(bench="ratio", device=device_name(args.device), size=args.size,
                                n_layers=shape.n_layers, n_probes=k, tokens=data.n_counted, collect_s=ours,
                                reference_s=ref, ratio=statistics.median(ratios), tokens_per_s=tps,
                                tflops=tps * cost.total(k) / 1e12, cost_model_ratio=model_ratio,
                                command=" ".join(sys.argv)))


if __name__ == "__main__":
    main()
