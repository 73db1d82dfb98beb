"""Edge ablation (issue 19): the cost of ``edges_needed`` per basis on one residual-stream pair.

Pair ``blocks.{l}.hook_resid_pre → blocks.{l+1}.hook_resid_pre`` of the bundled model on bundled held-out text.
Steps timed separately on the same batches: ``collect`` (G, KL-Jacobian M at both sites), the bases (local:
``local_interaction_bases`` of the pair; interaction and PCA from the statistics), the pair's graph in each basis
(``interaction_graph``, the graph stage's options), and ``edges_needed`` per basis (bisection; each probe is one
``measure_losses`` pass whose intervention runs ≤ k_B + 1 stacked forwards to B per batch).

    python benchmarks/bench_edge_ablation.py --n-tokens 512 --tolerance 0.01
"""

from __future__ import annotations

import argparse
import subprocess
import time
from pathlib import Path

import torch
from common import device_name, record

import tl_degeneracy as tld

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-tokens", type=int, default=512)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--layer", type=int, default=0, help="the pair resid_pre[layer] → resid_pre[layer + 1]")
    p.add_argument("--tolerance", type=float, default=0.01)
    p.add_argument("--out", type=Path, default=HERE / "edge_ablation_results.jsonl")
    args = p.parse_args(argv)

    model = tld.load_model(tld.bundled_model_path(), device=args.device)
    data = tld.token_batches(model, "stdlib-heldout", seq_len=args.seq_len, batch_size=args.batch_size,
                             n_tokens=args.n_tokens)
    pair = (f"blocks.{args.layer}.hook_resid_pre", f"blocks.{args.layer + 1}.hook_resid_pre")
    seconds: dict[str, float] = {}
    t = time.perf_counter()
    stats = tld.collect(model, data, sites=list(pair), jacobian="kl", n_probes=1, progress=False)
    seconds["collect"] = time.perf_counter() - t
    t = time.perf_counter()
    kinds = {"local": tld.local_interaction_bases(model, data, list(pair), stats=stats, n_probes=2),
             "interaction": tld.interaction_bases(stats, sites=list(pair)),
             "pca": {s: tld.pca_basis(stats.gram(s), mean=stats.mean(s)) for s in pair}}
    seconds["bases"] = time.perf_counter() - t
    results = {}
    for kind, bases in kinds.items():
        t = time.perf_counter()
        graph = tld.interaction_graph(model, data, bases, list(pair), method="integrated", n_points=2,
                                      estimator="probe", n_probes=1)
        seconds[f"graph_{kind}"] = time.perf_counter() - t
        t = time.perf_counter()
        needed = tld.edges_needed(model, data, bases, graph, pair=pair, tolerance=args.tolerance, progress=False)
        seconds[f"edges_needed_{kind}"] = time.perf_counter() - t
        results[kind] = {"n_edges": needed.n_edges, "n_total": needed.n_total, "fraction": needed.fraction,
                         "dims": [bases[s].dim for s in pair], "probes": len(needed.probed),
                         "forwards": needed.meta["forwards"],
                         "seconds_per_probe": seconds[f"edges_needed_{kind}"] / len(needed.probed)}
        print(kind, results[kind], f"{seconds[f'edges_needed_{kind}']:.1f} s", flush=True)
    entry = {"bench": "edge_ablation", "model": "bundled", "device": device_name(args.device), "pair": list(pair),
             "tokens": data.n_counted, "seq_len": args.seq_len, "batch_size": args.batch_size,
             "tolerance": args.tolerance, "loss": "kl", "results": results, "seconds": seconds,
             "load": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip(),
             "torch_threads": torch.get_num_threads()}
    record(args.out, entry)
    print(entry)


if __name__ == "__main__":
    main()
