"""Reproduce the companion paper's modular-addition result (arXiv 2405.10928, §4) in one command (issue 20).

Uses only the public API of tl_degeneracy (``import tl_degeneracy as tld``) and the TransformerLens model it
loads. For each site matching the companion's node layers

- ``blocks.0.hook_resid_pre``  (residual stream after the embedding; the companion's ``ln1.0``),
- ``blocks.0.hook_resid_mid``  (before the MLP; ``ln2.0``),
- ``blocks.0.hook_resid_post`` (before the unembedding; ``unembed`` — the model has no LayerNorm),

with every position's activation counted and the loss read at the answer position only
(``count="all", outputs="last"``), it computes the global interaction basis (KL metric, ``estimator="topk"``),
the local interaction basis (LIB) and PCA, and then:

- directions needed to keep the held-out accuracy within 1% of the unablated model
  (``ablation_curves(loss="top1")``, ``directions_needed(curve, 0.01)``);
- the leading Fourier frequency of each kept direction: 2-D DFT of its coordinate over the p² inputs (a, b) at
  each position, power grouped by frequency (see :func:`frequency_power`), fraction of the non-constant power
  in the top frequency; a basis's Fourier sparsity is the mean of that fraction over its kept directions;
- modules of the interaction graph of the kept LIB directions (``find_modules``) against the leading
  frequencies: adjusted mutual information over nodes with a clear frequency (fraction ≥ ``CLEAR``);
- ``neuron_sync`` blocks of the MLP and whether the neurons in a block share a leading frequency;
- the KL behavioral LLC of the whole model and of the MLP alone, at the settings ``calibrate_llc`` recommends.

Run (all numbers in RESULTS.md came from the first form)::

    python reproductions/modadd.py --out reproductions/out               # full budget
    python reproductions/modadd.py --small --out /tmp/modadd-small        # the test's budget (≈ 1 min)

It writes ``results.json`` and ``table.md`` into ``--out``. On TransformerLens 4.x ``hook_resid_mid`` cannot be
the input side of a Jacobian cut (tld refuses it), so there the LIB chain and the graph use
``resid_pre → resid_post`` and the LIB at ``resid_mid`` is reported as unavailable; TransformerLens 3.x
computes all three (RESULTS.md was made on 3.x).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

import tl_degeneracy as tld

SITES = ("blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post")
SITE_LABELS = {SITES[0]: "ln1.0", SITES[1]: "ln2.0", SITES[2]: "unembed"}
MLP_SITE = "blocks.0.mlp.hook_post"
#: a direction (or neuron) has a clear frequency when at least this fraction of its power is in one frequency
CLEAR = 0.5
#: accuracy tolerance of the companion's node ablation: within 1% of the unablated model
TOLERANCE = 0.01

#: the companion's published figures (from rib's committed outputs, quoted in issue 20), 5 seeds
PAPER = {
    "directions_needed": {
        "lib": {"ln1.0": [13, 9, 8, 8, 13], "ln2.0": [17, 13, 15, 13, 17], "unembed": [8, 10, 7, 7, 9]},
        "pca": {"ln1.0": [13, 9, 10, 8, 13], "ln2.0": [17, 13, 15, 13, 17], "unembed": [8, 10, 7, 7, 9]},
    },
    "of": 129,  # their bases carry the constant direction; ours are centred (128)
    "edges_needed_mean": {"lib": [86.6, 74.0, 634.2], "pca": [117.4, 85.2, 662.6]},
    "seed0_ln1.0_frequencies": [15, 1, 18, 56, 8, 36],
}

BUDGETS = {
    # pairs for the statistics, held-out pairs for the ablations, largest k measured densely, probes,
    # LLC grid and chain length
    "full": dict(n_stats=None, n_test=None, dense_keep=40, top_k=16, n_probes=8, graph_points=4,
                 llc_steps=[3e-7, 1e-6], llc_gammas=[1000.0], llc_n_steps=300, llc_burnin=100,
                 llc_pairs=512, llc_chains=4),
    "small": dict(n_stats=2048, n_test=1024, dense_keep=20, top_k=8, n_probes=4, graph_points=1,
                  llc_steps=[1e-6, 3e-6], llc_gammas=[1000.0], llc_n_steps=20, llc_burnin=5,
                  llc_pairs=128, llc_chains=2),
}


# ---------------------------------------------------------------------------------------------------------
# Fourier analysis
# ---------------------------------------------------------------------------------------------------------
def frequency_labels(p: int) -> torch.Tensor:
    """[p, p] int: the frequency f ∈ 1..(p−1)/2 each 2-D DFT component (k₁, k₂) belongs to, −1 for none.

    fold(k) = min(k, p − k). A component belongs to f when {fold(k₁), fold(k₂)} ⊆ {0, f} and it is not the
    constant (0, 0): cos/sin(2πf a/p), (2πf b/p), (2πf (a ± b)/p) and their products. Components mixing two
    different non-zero frequencies belong to none (−1), as does (0, 0) (−1, excluded from the total).
    """
    k = torch.arange(p)
    fold = torch.minimum(k, p - k)
    f1, f2 = fold[:, None].expand(p, p), fold[None, :].expand(p, p)
    freq = torch.maximum(f1, f2)
    ok = (f1 == 0) | (f2 == 0) | (f1 == f2)
    labels = torch.where(ok, freq, torch.full_like(freq, -1))
    labels[0, 0] = -1
    return labels


def frequency_power(values: torch.Tensor, p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Power per frequency of functions on the p² inputs, summed over positions.

    ``values`` [p², T, n] (row a·p + b). Returns ``power`` [n, (p−1)/2 + 1] (column f = power in frequency f;
    column 0 unused) and ``total`` [n]: all non-constant power (every (k₁, k₂) ≠ (0, 0)), so
    ``power[:, f] / total`` is the share of frequency f.
    """
    n_pos, n = values.shape[1], values.shape[2]
    grid = values.to(torch.float64).reshape(p, p, n_pos, n)
    spec = torch.fft.fft2(grid, dim=(0, 1)).abs().pow(2).sum(2)  # [p, p, n]
    labels = frequency_labels(p)
    n_freq = (p - 1) // 2 + 1
    power = torch.zeros(n, n_freq, dtype=torch.float64)
    flat_spec, flat_lab = spec.reshape(p * p, n), labels.reshape(-1)
    keep = flat_lab >= 0
    power.index_add_(1, flat_lab[keep], flat_spec[keep].T)
    total = flat_spec.sum(0) - flat_spec[0]
    return power, total


def leading_frequencies(values: torch.Tensor, p: int) -> list[dict[str, float | int]]:
    """For each of the n functions in ``values`` [p², T, n]: its top frequency and that frequency's share."""
    power, total = frequency_power(values, p)
    out = []
    for i in range(power.shape[0]):
        f = int(power[i].argmax())
        share = float(power[i, f] / total[i]) if float(total[i]) > 0 else 0.0
        out.append({"frequency": f, "fraction": share})
    return out


# ---------------------------------------------------------------------------------------------------------
# Adjusted mutual information (Vinh, Epps & Bailey 2010; arithmetic-mean normalisation)
# ---------------------------------------------------------------------------------------------------------
def _entropy(counts: list[int], n: int) -> float:
    return -sum(c / n * math.log(c / n) for c in counts if c > 0)


def mutual_information(a: list[Any], b: list[Any]) -> float:
    """MI (nats) of two labelings of the same items."""
    n = len(a)
    joint, ca, cb = Counter(zip(a, b, strict=True)), Counter(a), Counter(b)
    return sum(nij / n * math.log(n * nij / (ca[i] * cb[j])) for (i, j), nij in joint.items())


def expected_mutual_information(a: list[Any], b: list[Any]) -> float:
    """E[MI] over random labelings with the same cluster sizes (the hypergeometric model), exactly."""
    n = len(a)
    ca, cb = list(Counter(a).values()), list(Counter(b).values())
    lg = math.lgamma
    emi = 0.0
    for ai in ca:
        for bj in cb:
            for nij in range(max(1, ai + bj - n), min(ai, bj) + 1):
                log_p = (lg(ai + 1) + lg(bj + 1) + lg(n - ai + 1) + lg(n - bj + 1) - lg(n + 1) - lg(nij + 1)
                         - lg(ai - nij + 1) - lg(bj - nij + 1) - lg(n - ai - bj + nij + 1))
                emi += nij / n * math.log(n * nij / (ai * bj)) * math.exp(log_p)
    return emi


def adjusted_mutual_information(a: list[Any], b: list[Any]) -> float:
    """AMI = (MI − E[MI]) / (½(H(a) + H(b)) − E[MI]); 1 for identical partitions, ≈ 0 for independent ones.

    Both labelings with a single cluster (or identical ones with zero entropy) give 1, as in scikit-learn.
    """
    if len(a) != len(b):
        raise ValueError("the two labelings must label the same items")
    n = len(a)
    ha, hb = _entropy(list(Counter(a).values()), n), _entropy(list(Counter(b).values()), n)
    if ha == 0 and hb == 0:
        return 1.0
    mi, emi = mutual_information(a, b), expected_mutual_information(a, b)
    denom = 0.5 * (ha + hb) - emi
    if abs(denom) < 1e-15:
        return 0.0
    return (mi - emi) / denom


# ---------------------------------------------------------------------------------------------------------
# the reproduction
# ---------------------------------------------------------------------------------------------------------
def _truncate(basis: Any, k: int) -> Any:
    """The first k directions of a basis (a smaller InteractionBasis of the same kind)."""
    return dataclasses.replace(basis, C=basis.C[:k], C_pinv=basis.C_pinv[:, :k], lambdas=basis.lambdas[:k])


def _activations(model: Any, tokens: torch.Tensor, site: str, batch: int = 2048) -> torch.Tensor:
    """The activation at ``site`` for every row of ``tokens`` ([N, T, d], float64, CPU)."""
    parts = []
    with torch.no_grad():
        for start in range(0, tokens.shape[0], batch):
            _, cache = model.run_with_cache(tokens[start:start + batch], names_filter=[site])
            parts.append(cache[site].detach().to("cpu", torch.float64))
    return torch.cat(parts)


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(model_name: str, budget: dict[str, Any], *, seed: int = 0, save: Any = None) -> dict[str, Any]:
    """Everything the table needs, for one model (see the module docstring).

    ``save(partial_results)`` (optional) is called after every stage, so a long run leaves what it finished.
    """
    save = save or (lambda _res: None)
    t_start = time.perf_counter()
    model = tld.load_model(model_name)
    every = tld.modadd_data(model)
    p = every.p
    test = tld.modadd_data(model, split="test")
    gen = torch.Generator().manual_seed(seed)
    stats_tokens = every.tokens if budget["n_stats"] is None else every.tokens[
        torch.randperm(len(every), generator=gen)[: budget["n_stats"]].sort().values]
    test_tokens = test.tokens if budget["n_test"] is None else test.tokens[
        torch.randperm(len(test), generator=gen)[: budget["n_test"]].sort().values]
    data = tld.token_batches(model, stats_tokens, batch_size=1024, count="all", outputs="last")
    test_data = tld.token_batches(model, test_tokens, batch_size=2048, count="all", outputs="last")
    res: dict[str, Any] = {"model": model_name, "p": p, "test_accuracy": test.accuracy(model),
                           "n_stats_pairs": int(stats_tokens.shape[0]), "n_test_pairs": int(test_tokens.shape[0]),
                           "budget": budget}
    _log(f"model {model_name}: p = {p}, held-out accuracy {res['test_accuracy']:.4f}")

    stats = tld.collect(model, data, sites=[*SITES, MLP_SITE], jacobian="kl", estimator="topk",
                        top_k=budget["top_k"], n_probes=budget["n_probes"], seed=seed, neuron_sync=True,
                        sync_layers=[0], progress=False)
    _log("statistics collected")
    bases: dict[str, dict[str, Any]] = {"interaction": tld.interaction_bases(stats, sites=list(SITES))}
    bases["pca"] = {s: tld.pca_basis(stats.gram(s, centered=True), mean=stats.mean(s)) for s in SITES}
    try:
        lib_sites = list(SITES)
        bases["lib"] = tld.local_interaction_bases(model, data, lib_sites, stats=stats,
                                                   n_probes=budget["n_probes"], seed=seed)
        res["lib_note"] = None
    except tld.BadInputError as err:  # TransformerLens 4.x: resid_mid cannot be cut
        lib_sites = [SITES[0], SITES[2]]
        bases["lib"] = tld.local_interaction_bases(model, data, lib_sites, stats=stats,
                                                   n_probes=budget["n_probes"], seed=seed)
        res["lib_note"] = f"LIB chain resid_pre → resid_post only ({err})"
    res["lib_sites"] = lib_sites
    _log("bases built")

    # node ablation: directions needed for the held-out accuracy within 1%
    res["sites"] = {}
    all_tokens = every.tokens
    for site in SITES:
        present = {kind: b[site] for kind, b in bases.items() if site in b}
        row: dict[str, Any] = {"label": SITE_LABELS[site], "dims": {k: b.dim for k, b in present.items()}}
        dense = min(b.dim for b in present.values())  # one keep list for every basis: up to the smallest dim
        keep = sorted(set(range(0, min(budget["dense_keep"], dense) + 1)) | {dense})
        curves = tld.ablation_curves(model, test_data, present, site=site, keep=keep, loss="top1", progress=False)
        row["needed"], row["curves"] = {}, {}
        for kind, curve in curves.items():
            row["needed"][kind] = tld.directions_needed(curve, TOLERANCE)
            row["curves"][kind] = {"keep": list(curve.keep), "top1": [float(x) for x in curve.loss]}
        acts = _activations(model, all_tokens, site)
        row["fourier"] = {}
        for kind, basis in present.items():
            k = row["needed"][kind] if row["needed"][kind] is not None else basis.dim
            coords = basis.transform(acts)[..., :k] if k > 0 else acts[..., :0]
            lead = leading_frequencies(coords, p) if k > 0 else []
            fr = [d["fraction"] for d in lead]
            row["fourier"][kind] = {
                "leading": lead,
                "mean_top_fraction": sum(fr) / len(fr) if fr else None,
                "n_clear": sum(f >= CLEAR for f in fr),
                "distinct_clear_frequencies": sorted({d["frequency"] for d in lead if d["fraction"] >= CLEAR}),
            }
        res["sites"][site] = row
        _log(f"{site}: needed {row['needed']}")
        save(res)

    # modules of the interaction graph of the kept LIB directions vs their frequencies
    kept = {}
    for site in lib_sites:
        k = res["sites"][site]["needed"]["lib"] or bases["lib"][site].dim
        kept[site] = _truncate(bases["lib"][site], max(k, 1))
    graph = tld.interaction_graph(model, data, kept, lib_sites, method="integrated",
                                  n_points=budget["graph_points"], estimator="exact")
    top_edge = max(float(e.max()) for e in graph.edges.values())
    eps = 1e-3 * top_edge
    mods = tld.find_modules(graph, eps=eps, seed=seed)
    mod_labels, freq_labels = [], []
    for site in lib_sites:
        lead = res["sites"][site]["fourier"]["lib"]["leading"]
        for i, module in enumerate(mods.labels[site].tolist()):
            if i < len(lead) and lead[i]["fraction"] >= CLEAR:
                mod_labels.append(module)
                freq_labels.append(lead[i]["frequency"])
    res["modules"] = {
        "eps": eps, "eps_rule": "1e-3 x the largest edge", "n_modules": mods.n_modules, "cost": mods.cost,
        "labels": {s: mods.labels[s].tolist() for s in lib_sites}, "n_clear_nodes": len(mod_labels),
        "ami": adjusted_mutual_information(mod_labels, freq_labels) if len(mod_labels) >= 2 else None,
    }
    _log(f"modules: {mods.n_modules}, AMI {res['modules']['ami']}")
    save(res)

    # synchronised neurons vs their frequencies
    ns = tld.neuron_sync(stats, 0)
    neuron_lead = leading_frequencies(_activations(model, all_tokens, MLP_SITE), p)
    alive = [i for i in range(len(neuron_lead)) if float(ns.mean_f_sq[i]) > 0]
    taus = [float(t) for t in ns.default_taus(measure="normalized_distance")]
    sync: dict[str, Any] = {"n_alive": len(alive), "per_tau": []}
    for tau in taus:
        blocks = [b for b in ns.blocks(tau, measure="normalized_distance") if len(b) >= 2 and b[0] in alive]
        if not blocks:
            continue
        shared = 0
        for b in blocks:
            freqs = [neuron_lead[i]["frequency"] for i in b]
            shared += Counter(freqs).most_common(1)[0][1] == len(freqs)
        sync["per_tau"].append({"tau": tau, "n_blocks": len(blocks), "neurons_in_blocks": sum(map(len, blocks)),
                                "blocks_one_frequency": shared})
    clear_neurons = [neuron_lead[i] for i in alive if neuron_lead[i]["fraction"] >= CLEAR]
    sync["n_clear_neurons"] = len(clear_neurons)
    sync["neuron_frequencies"] = dict(Counter(d["frequency"] for d in clear_neurons).most_common())
    res["neuron_sync"] = sync
    _log("neuron sync done")
    save(res)

    # KL behavioral LLC of the whole model and of the MLP alone
    llc_tokens = every.tokens[torch.randperm(len(every), generator=gen)[: budget["llc_pairs"]]]
    llc_data = tld.token_batches(model, llc_tokens, batch_size=len(llc_tokens), count="all", outputs="last")
    res["llc"] = {}
    for name, params in (("model", "all"), ("mlp", "blocks.0.mlp")):
        cal = tld.calibrate_llc(model, llc_data, step_sizes=budget["llc_steps"], localizations=budget["llc_gammas"],
                                nbeta=float(len(llc_tokens)), n_steps=budget["llc_n_steps"],
                                n_burnin=budget["llc_burnin"], n_chains=budget["llc_chains"], params=params,
                                loss="kl", seed=seed, progress=False)
        res["llc"][name] = {"params": params, "nbeta": float(len(llc_tokens)), "recommended": cal.recommended,
                            "reason": cal.reason, "cells": cal.rows()}
        _log(f"LLC {name}: {cal.recommended} ({cal.reason})")
        save(res)
    res["seconds"] = time.perf_counter() - t_start
    return res


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = "") -> str:
    return "n/a" if x is None else format(x, spec)


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: our seeds beside the companion's published figures."""
    lines = [f"Seeds: {len(results)} ({', '.join(r['model'] for r in results)}). "
             f"Companion: 5 seeds, directions out of {PAPER['of']} (with the constant direction; ours are "
             "centred, out of 128).", "",
             "| site | basis | ours: directions needed (per seed) | companion (5 seeds) | our dims | "
             "mean top-frequency power share of kept directions | kept directions with a clear frequency |",
             "|---|---|---|---|---|---|---|"]
    for site in SITES:
        label = SITE_LABELS[site]
        for kind in ("lib", "interaction", "pca"):
            ours = [r["sites"][site]["needed"].get(kind) for r in results]
            paper = PAPER["directions_needed"].get(kind, {}).get(label)
            four = [r["sites"][site]["fourier"].get(kind) for r in results]
            dims = [r["sites"][site]["dims"].get(kind) for r in results]
            share = "/".join(_fmt(f and f["mean_top_fraction"], ".2f") for f in four)
            clear = "/".join("n/a" if f is None else f"{f['n_clear']}" for f in four)
            lines.append(f"| {label} | {kind} | {'/'.join(_fmt(x) for x in ours)} | "
                         f"{'/'.join(map(str, paper)) if paper else '—'} | {'/'.join(_fmt(d) for d in dims)} | "
                         f"{share} | {clear} |")
    lines += ["", "Leading frequencies of the kept directions (in order of the basis), seed by seed:", ""]
    for r in results:
        for site in SITES:
            for kind in ("lib", "pca"):
                f = r["sites"][site]["fourier"].get(kind)
                if f:
                    fr = ", ".join(f"{d['frequency']} ({d['fraction']:.2f})" for d in f["leading"])
                    lines.append(f"- {r['model']} {SITE_LABELS[site]} {kind}: {fr}")
    lines.append(f"- companion seed 0 ln1.0 (LIB): {', '.join(map(str, PAPER['seed0_ln1.0_frequencies']))}")
    lines += ["", "| quantity | " + " | ".join(r["model"] for r in results) + " |",
              "|---|" + "---|" * len(results)]

    def row(name: str, get: Any) -> None:
        lines.append(f"| {name} | " + " | ".join(get(r) for r in results) + " |")

    row("held-out accuracy", lambda r: f"{r['test_accuracy']:.4f}")
    row("modules (LIB graph, ε = 1e-3·max edge)", lambda r: str(r["modules"]["n_modules"]))
    row("AMI(module, frequency) over clear nodes", lambda r: f"{_fmt(r['modules']['ami'], '.3f')} "
        f"({r['modules']['n_clear_nodes']} nodes)")
    row("neurons with a clear frequency / alive", lambda r: f"{r['neuron_sync']['n_clear_neurons']} / "
        f"{r['neuron_sync']['n_alive']}")
    row("neuron frequencies (count)", lambda r: ", ".join(f"{k}: {v}" for k, v in
                                                          r["neuron_sync"]["neuron_frequencies"].items()))
    row("neuron_sync blocks of ≥ 2 sharing one frequency (τ: blocks)", lambda r: "; ".join(
        f"τ={t['tau']:.2g}: {t['blocks_one_frequency']}/{t['n_blocks']}"
        for t in r["neuron_sync"]["per_tau"][:: max(1, len(r["neuron_sync"]["per_tau"]) // 5)]))
    for name in ("model", "mlp"):
        row(f"KL LLC, {name} (recommended setting)", lambda r, name=name: _llc(r["llc"][name]))
    row("edges needed", lambda r: "not computed (edge ablation not on main yet)")
    return "\n".join(lines) + "\n"


def _llc(entry: dict[str, Any]) -> str:
    rec = entry["recommended"]
    if rec is None:
        return f"no recommendation: {entry['reason']}"
    return (f"{rec['llc']:.1f} ± {rec['llc_se']:.1f} (ε = {rec['step_size']:g}, γ = {rec['localization']:g}, "
            f"nβ = {entry['nbeta']:g})")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["modadd-113"],
                    help="bundled model names or folders, one per seed (default: the shipped modadd-113)")
    ap.add_argument("--small", action="store_true", help="the test suite's small budget (≈ 1 min)")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    budget = BUDGETS["small" if args.small else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []

    def save(partial: dict[str, Any]) -> None:
        (args.out / "partial.json").write_text(json.dumps({"done": results, "running": partial}, indent=1))

    for m in args.models:
        results.append(run(m, budget, save=save))
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
           "cpus": os.cpu_count(), "torch": torch.__version__, "tl_degeneracy": tld.__version__,
           "threads": torch.get_num_threads(), "load": os.getloadavg(), "command": " ".join(sys.argv)}
    (args.out / "results.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    (args.out / "table.md").write_text(table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
