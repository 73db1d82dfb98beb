"""Ablation curves on the bundled model (issue 14): cost per point, measured KL against the quadratic prediction,
and the interaction basis against PCA.

For each site: collect activation + KL-Jacobian statistics (``--n-probes`` probes) on the first ``--stats-tokens``
counted tokens of the bundled held-out file, build the interaction and PCA bases, then measure KL ablation curves
on ``--tokens`` tokens (the same file; the first ones, so in-sample for the basis mean) with the prediction.
Prints, per site and k: measured KL, predicted KL and their ratio for both bases, the number of schedule points
where the interaction curve is at or below PCA's, and the wall time per point (= one forward per batch; the
unablated forward per batch is shared by every point of the schedule).

    python benchmarks/bench_ablation.py                          # CPU-sized defaults
    python benchmarks/bench_ablation.py --sites blocks.2.hook_resid_pre --tokens 4096 --device cuda
"""

from __future__ import annotations

import argparse
import time

import torch

import tl_degeneracy as tld


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sites", default="blocks.1.hook_resid_pre,blocks.3.hook_resid_pre,blocks.1.mlp.hook_post")
    ap.add_argument("--stats-tokens", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--n-probes", type=int, default=4)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    sites = args.sites.split(",")
    model = tld.load_model(tld.bundled_model_path(), device=args.device)
    stats_data = tld.load_data(model, None, seq_len=args.seq_len, batch_size=args.batch_size,
                               n_tokens=args.stats_tokens)
    data = tld.load_data(model, None, seq_len=args.seq_len, batch_size=args.batch_size, n_tokens=args.tokens)
    t0 = time.perf_counter()
    stats = tld.collect(model, stats_data, sites=sites, jacobian="kl", n_probes=args.n_probes, progress=False)
    print(f"device {args.device}; statistics on {stats.n_tokens} tokens in {time.perf_counter() - t0:.1f} s; "
          f"curves on {data.n_counted} tokens, {len(data)} batches of {args.batch_size} x {args.seq_len}")
    for site in sites:
        ib = tld.interaction_bases(stats, sites=[site])[site]
        pb = tld.pca_basis(stats.gram(site), mean=stats.mean(site))
        curves = tld.ablation_curves(model, data, {"interaction": ib, "pca": pb}, site=site, stats=stats,
                                     progress=False)
        c_ib, c_pca = curves["interaction"], curves["pca"]
        n_points = len(c_ib.keep) + len(c_pca.keep)
        secs = c_ib.meta["seconds"]
        print(f"\n## {site}: d={ib.input_dim}, IB dim={ib.dim}, PCA dim={pb.dim}; {n_points} points in {secs:.1f} s "
              f"= {secs / (n_points + 1) / len(data) * 1e3:.1f} ms per forward, "
              f"{len(data) * (n_points + 1)} forwards ({len(data)} per point + {len(data)} unablated)")
        print("| k | KL IB measured | KL IB predicted | ratio | KL PCA measured | KL PCA predicted | ratio |")
        print("|---|---|---|---|---|---|---|")

        def at(curve, k):  # keeping k > dim directions keeps them all
            i = curve.keep.index(min(k, curve.dim))
            return curve.loss[i].item(), curve.predicted[i].item()

        def ratio(m, p):
            return f"{m / p:.2f}" if p > 1e-12 else "-"

        ks = sorted(k for k in set(c_ib.keep) | set(c_pca.keep)
                    if min(k, c_ib.dim) in c_ib.keep and min(k, c_pca.dim) in c_pca.keep)
        n_below, n_cmp, worst = 0, 0, 0.0
        for k in ks:
            (mi, pi), (mp, pp) = at(c_ib, k), at(c_pca, k)
            print(f"| {k} | {mi:.4g} | {pi:.4g} | {ratio(mi, pi)} | {mp:.4g} | {pp:.4g} | {ratio(mp, pp)} |")
            if k <= c_ib.dim:  # beyond its dim the interaction basis cannot keep more: not a like-for-like k
                n_cmp += 1
                n_below += mi <= mp
                if mp > 0:
                    worst = max(worst, mi / mp)
        print(f"at k ≤ IB dim: interaction ≤ PCA at {n_below} of {n_cmp} k, largest ratio IB/PCA {worst:.3g}; "
              f"KL at keep=IB dim: {c_ib.loss[-1].item():.3g}; "
              f"directions needed for KL ≤ 0.01 (on the schedule): IB {tld.directions_needed(c_ib, 0.01)}, "
              f"PCA {tld.directions_needed(c_pca, 0.01)}; baseline CE {c_ib.baseline:.3f} nats")

if __name__ == "__main__":
    torch.set_num_threads(1)
    main()
