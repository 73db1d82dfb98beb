"""The GPU suite (issue 21), run by ``benchmarks/gpu_suite.sh``: one Markdown block with every figure.

GPT-2-small shape (12 layers, random weights built locally, all 24 resid_pre + mlp_post sites, KL Jacobian):

1. ``collect`` tokens/s and achieved TFLOP/s (cost model, ECOSYSTEM §5) at K = 1 and 4, accurate (float32,
   TF32 off) and fast (bfloat16 autocast) precision;
2. peak device memory (``torch.cuda.max_memory_allocated``; CPU: the resident high-water mark the run added
   plus the weights) against ``plan_memory(...).total_bytes()``;
3. the fast mode's noise floor: max over sites of the relative Frobenius error of G and of M against the
   accurate run on the same tokens and probes (K = 1);
4. ``estimate_llc`` SGLD steps/s on the last block.

``--tiny`` runs the same steps on the bundled 4-layer model with a few thousand tokens, on any device (CI).

    python benchmarks/gpu_suite.py --out suite.md                 # GPU, GPT-2-small shape, 262,144 tokens
    python benchmarks/gpu_suite.py --tiny --device cpu --out tiny.md
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from common import cost_model, device_name, gpt2_shaped_model  # noqa: E402

import tl_degeneracy as tld  # noqa: E402
from tl_degeneracy.adapter import ModelShape  # noqa: E402
from tl_degeneracy.collection.memory import plan_memory  # noqa: E402
from tl_degeneracy.llc.behavioral import estimate_llc  # noqa: E402
from tl_degeneracy.sites import site_dim  # noqa: E402

GIB = 1024**3


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _reset_peak(device: str) -> int:
    """Reset the peak counter; returns the bytes in use now."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _rss("VmRSS")


def _peak(device: str, before: int) -> int:
    """Peak bytes the run added since :func:`_reset_peak` (CPU: VmHWM − RSS before)."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() - before
    return max(0, _rss("VmHWM") - before)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def run_suite(args: argparse.Namespace) -> str:
    device = args.device
    if args.tiny:
        model = tld.load_model(tld.bundled_model_path(), device=device)
        size = "bundled 4-layer model (tiny mode)"
    else:
        model = gpt2_shaped_model("small", device=device)
        size = "GPT-2-small shape (random weights)"
    shape = ModelShape.of(model)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    cost = cost_model(shape, seq_len=args.seq_len, site_dims=[site_dim(model, s) for s in sites], jacobian=True)
    n_rows = -(-args.n_tokens // (args.seq_len - 1))
    tokens = torch.randint(0, shape.d_vocab, (n_rows, args.seq_len), generator=torch.Generator().manual_seed(0))
    data = tld.token_batches(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size, n_tokens=args.n_tokens)
    warm = tld.token_batches(model, tokens[: args.batch_size], seq_len=args.seq_len, batch_size=args.batch_size)
    plan = plan_memory(model, sites, batch_size=args.batch_size, seq_len=args.seq_len, jacobian=True)
    weights = plan.weight_bytes

    lines = [
        f"### GPU suite — {size}",
        "",
        f"- device: {device_name(device)}; torch {torch.__version__}; host {platform.node()}; "
        f"{datetime.datetime.now().isoformat(timespec='minutes')}",
        f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`",
        f"- load: {os.getloadavg()[0]:.2f} (1-min average at the end of setup)",
        f"- model: {shape}; {len(sites)} sites (resid_pre + mlp_post), KL Jacobian; {data.n_counted:,} counted "
        f"tokens in batches of {args.batch_size} × {args.seq_len}",
        "",
        "| precision | K | tokens/s | achieved TFLOP/s | cost-model GFLOP/token | peak GiB (incl. weights) | "
        "plan GiB | peak / plan |",
        "|---|---|---|---|---|---|---|---|",
    ]
    kept: dict[tuple[str, int], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    for precision in ("accurate", "fast"):
        for k in args.probes:
            kw = dict(sites=sites, jacobian="kl", n_probes=k, precision=precision, memory_budget=None,
                      progress=False, seed=0)
            tld.collect(model, warm, **kw)  # warm-up: kernels, allocator
            before = _reset_peak(device)
            t0 = time.perf_counter()
            stats = tld.collect(model, data, **kw)
            _sync(device)
            dt = time.perf_counter() - t0
            peak = _peak(device, before) + weights
            tps = data.n_counted / dt
            flops = cost.total(k)
            lines.append(f"| {precision} | {k} | {tps:,.0f} | {tps * flops / 1e12:.3f} | {flops / 1e9:.3f} | "
                         f"{peak / GIB:.3f} | {plan.total_bytes() / GIB:.3f} | {peak / plan.total_bytes():.2f} |")
            if k == 1:
                kept[(precision, k)] = {s: (stats.gram(s), stats.jacobian_gram(s)) for s in sites}
            del stats
            print(lines[-1], flush=True)
    if ("accurate", 1) in kept and ("fast", 1) in kept:
        acc, fast = kept[("accurate", 1)], kept[("fast", 1)]
        g = max(relative_error(fast[s][0], acc[s][0]) for s in sites)
        m = max(relative_error(fast[s][1], acc[s][1]) for s in sites)
        lines += ["", f"- fast-mode noise floor (K = 1, {data.n_counted:,} tokens, same probes): max over sites of "
                      f"‖G_fast − G_acc‖_F / ‖G_acc‖_F = {g:.2e}, of M: {m:.2e}"]

    llc_data = tld.token_batches(model, tokens[: 2 * args.batch_size], seq_len=args.seq_len,
                                 batch_size=args.batch_size)
    llc_kw = dict(params=f"blocks.{shape.n_layers - 1}", nbeta=1000.0, step_size=1e-5, localization=100.0,
                  n_chains=args.llc_chains, progress=False)
    estimate_llc(model, llc_data, n_steps=2, n_burnin=1, **llc_kw)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    estimate_llc(model, llc_data, n_steps=args.llc_steps, n_burnin=args.llc_steps // 2, **llc_kw)
    _sync(device)
    dt = time.perf_counter() - t0
    lines.append(f"- LLC (`estimate_llc`, KL, last block, {args.llc_chains} chains, batches of {args.batch_size} × "
                 f"{args.seq_len}): {args.llc_steps / dt:.2f} steps/s ({args.llc_steps} steps in {dt:.1f} s)")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="the bundled 4-layer model and a few thousand tokens")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--n-tokens", type=int, default=None, help="default 262,144 (tiny: 1,024)")
    p.add_argument("--seq-len", type=int, default=None, help="default 128 (tiny: 32)")
    p.add_argument("--batch-size", type=int, default=None, help="default 32 (tiny: 4)")
    p.add_argument("--probes", default="1,4")
    p.add_argument("--llc-steps", type=int, default=None, help="default 100 (tiny: 6)")
    p.add_argument("--llc-chains", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=None, help="write the Markdown block here too")
    args = p.parse_args(argv)
    tiny = args.tiny
    args.n_tokens = args.n_tokens or (1024 if tiny else 262_144)
    args.seq_len = args.seq_len or (32 if tiny else 128)
    args.batch_size = args.batch_size or (4 if tiny else 32)
    args.llc_steps = args.llc_steps or (6 if tiny else 100)
    args.probes = [int(x) for x in str(args.probes).split(",")]
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU; pass --device cpu (with --tiny) or fix the install")
    block = run_suite(args)
    if args.device.startswith("cuda"):
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, check=False).stdout.strip()
        block += f"- nvidia-smi: {smi}\n"
    print(block)
    if args.out:
        Path(args.out).write_text(block)


if __name__ == "__main__":
    main()
