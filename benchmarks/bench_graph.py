"""Interaction graph (issue 19): tokens/s of the local interaction basis and of the edges.

Sites: the residual stream, ``blocks.{l}.hook_resid_pre`` for every layer l and ``blocks.{L-1}.hook_resid_post``
(L + 1 sites, L pairs: rib's residual-stream graph). Steps timed separately on the same token batches:

1. ``collect`` (G at every site, KL-Jacobian M, K = 1 probe) — needed for the last site's basis and every G;
2. ``local_interaction_bases`` (``--lib-probes`` probes per batch; one pass per pair, backward B → A only);
3. ``interaction_graph`` (``--method``, ``--n-points``, ``--estimator``, ``--n-probes``; one pass per pair).

``--pairs P`` times only the first P pairs (a quick CPU run on a deep model); the figure for all L pairs is then
extrapolated as (seconds per pair) × L and labelled so. rib's figure to compare with: ≈ 10 h for GPT-2 small's
edges on 500 sequences of 1024 tokens ≈ 14 tokens/s (A100, float64; ECOSYSTEM.md).

    python benchmarks/bench_graph.py --model bundled
    python benchmarks/bench_graph.py --model gpt2-small --pairs 1 --rows 2 --seq-len 16
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch
from common import device_name, gpt2_shaped_model, record

import tl_degeneracy as tld
from tl_degeneracy.adapter import ModelAdapter

HERE = Path(__file__).resolve().parent


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", choices=["bundled", "gpt2-small"], default="bundled")
    p.add_argument("--device", default="cpu")
    p.add_argument("--rows", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--pairs", type=int, default=None, help="time only the first P pairs; extrapolate to all")
    p.add_argument("--method", default="integrated")
    p.add_argument("--n-points", type=int, default=2)
    p.add_argument("--estimator", default="probe")
    p.add_argument("--n-probes", type=int, default=1)
    p.add_argument("--lib-probes", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE / "graph_results.jsonl")
    args = p.parse_args(argv)

    if args.model == "bundled":
        model = tld.load_model(tld.bundled_model_path(), device=args.device)
    else:
        model = gpt2_shaped_model("small", device=args.device)
    L = ModelAdapter(model).n_layers
    sites_all = [f"blocks.{i}.hook_resid_pre" for i in range(L)] + [f"blocks.{L - 1}.hook_resid_post"]
    n_pairs = L if args.pairs is None else min(args.pairs, L)
    sites = sites_all[:n_pairs + 1]
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, ModelAdapter(model).d_vocab, (args.rows, args.seq_len), generator=gen)
    data = tld.token_batches(model, tokens, batch_size=args.batch_size)
    n_tok = data.n_counted

    t = time.perf_counter()
    stats = tld.collect(model, data, sites=sites, jacobian="kl", n_probes=1, progress=False, memory_budget=None)
    _sync(args.device)
    t_collect = time.perf_counter() - t
    t = time.perf_counter()
    bases = tld.local_interaction_bases(model, data, sites, stats=stats, n_probes=args.lib_probes)
    _sync(args.device)
    t_lib = time.perf_counter() - t
    t = time.perf_counter()
    graph = tld.interaction_graph(model, data, bases, sites, method=args.method, n_points=args.n_points,
                                  estimator=args.estimator, n_probes=args.n_probes)
    _sync(args.device)
    t_edges = time.perf_counter() - t

    scale = L / n_pairs  # seconds per pair × L pairs
    entry = {
        "bench": "graph", "model": args.model, "device": device_name(args.device), "n_layers": L,
        "pairs_timed": n_pairs, "extrapolated_to_all_pairs": n_pairs < L, "tokens": n_tok,
        "rows": args.rows, "seq_len": args.seq_len, "batch_size": args.batch_size,
        "method": args.method, "n_points": args.n_points, "estimator": args.estimator, "n_probes": args.n_probes,
        "lib_probes": args.lib_probes, "dims": [b.dim for b in bases.values()],
        "seconds": {"collect": t_collect, "lib": t_lib, "edges": t_edges},
        "tokens_per_s_all_pairs": {"collect": n_tok / t_collect, "lib": n_tok / (t_lib * scale),
                                   "edges": n_tok / (t_edges * scale),
                                   "lib+edges": n_tok / ((t_lib + t_edges) * scale)},
        "max_edge_stderr": graph.meta.get("max_stderr"),
        "load": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
        "torch_threads": torch.get_num_threads(),
    }
    record(args.out, entry)
    print(entry)


if __name__ == "__main__":
    main()
