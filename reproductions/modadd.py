"""Reproduce the companion paper's modular-addition result (arXiv 2405.10928, §4) in one command (issue 20).

Uses only the public API of tl_degeneracy (``import tl_degeneracy as tld``) and the TransformerLens model it
loads. For each site matching the companion's node layers

- ``blocks.0.hook_resid_pre``  (residual stream after the embedding; the companion's ``ln1.0``),
- ``blocks.0.hook_resid_mid``  (before the MLP; ``ln2.0``),
- ``blocks.0.hook_resid_post`` (before the unembedding; ``unembed`` — the model has no LayerNorm),

with every position's activation counted and the loss read at the answer position only
(``count="all", outputs="last"``), it computes the global interaction basis and the local interaction basis
(LIB) for both output metrics, ``kl`` (``estimator="topk"``) and ``mse`` (the companion's identity metric on
the logits; ``estimator="exact"``), and PCA, and then:

- directions needed to keep the held-out accuracy within 1% of the unablated model
  (``ablation_curves(loss="top1")``, ``directions_needed(curve, 0.01)``);
- the leading Fourier frequency of each kept direction: 2-D DFT of its coordinate over the p² inputs (a, b) at
  each position, power grouped by frequency (see :func:`frequency_power`), fraction of the non-constant power
  in the top frequency; a basis's Fourier sparsity is the mean of that fraction over its kept directions;
- for each basis, the interaction graph of its kept directions (integrated gradients) and the edges needed per
  consecutive site pair to keep the held-out accuracy within 0.1% (``edges_needed(..., loss="top1",
  tolerance=0.001)``, bisection), and for the companion's third pair, unembed → logits: the logits
  (``unembed.hook_out``, site kind ``logits``) in their own coordinates (``tld.identity_basis``), at the answer
  position only (``count="last"``: the companion's node layers after the attention hold the last position);
- modules of each graph (``find_modules``) against the leading frequencies: adjusted mutual information over
  nodes with a clear frequency (fraction ≥ ``CLEAR``);
- ``neuron_sync`` blocks of the MLP and whether the neurons in a block share a leading frequency;
- the KL behavioral LLC of the whole model and of the MLP alone: ``calibrate_llc``'s verdicts over the budget's
  grid and, where it recommends a setting, that estimate.

Each model's data are its own (``tld.modadd_data(model)`` reads the token file written beside the model's
folder), so every seed is scored on its own held-out pairs.

Run (from the repository root; RESULTS.md says which command made its numbers)::

    python reproductions/modadd.py --out runs/modadd                       # the shipped model, full budget
    python reproductions/modadd.py --models modadd-113 seeds/s1/modadd-113 seeds/s2/modadd-113 --out runs/modadd
    python reproductions/modadd.py --small --out /tmp/modadd-small          # the test's budget (≈ 1 min)
    python reproductions/modadd.py --combine a/results.json b/results.json --out runs/all    # one table
    python reproductions/modadd.py --llc-into runs/modadd/results.json --out runs/modadd-llc  # only the LLC
    python reproductions/modadd.py --combine a/results.json b/results.json --llc-from runs/modadd-llc/results.json \
        --out runs/all                                                  # join an LLC run to runs of the same weights

Other seeds are made with ``python scripts/train_modadd.py --seed S --split-seed S --out seeds/sS``
(deterministic; tens of minutes of CPU each). It writes ``results.json`` and ``table.md`` into ``--out``
(``partial.json`` after every stage). On TransformerLens 4.x ``hook_resid_mid`` cannot be the input side of a
Jacobian cut (tld refuses it), so there the LIB chain and the graphs use ``resid_pre → resid_post`` and the
LIB at ``resid_mid`` is reported as unavailable; TransformerLens 3.x computes all three (RESULTS.md was made
on 3.x).
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
LOGITS = "unembed.hook_out"  # the companion's output node layer: the logits, identity basis
SITE_LABELS = {SITES[0]: "ln1.0", SITES[1]: "ln2.0", SITES[2]: "unembed", LOGITS: "logits"}
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
    "edges_needed_mean": {"lib": {"ln1.0→ln2.0": 86.6, "ln2.0→unembed": 74.0, "unembed→logits": 634.2},
                          "pca": {"ln1.0→ln2.0": 117.4, "ln2.0→unembed": 85.2, "unembed→logits": 662.6}},
    "seed0_ln1.0_frequencies": [15, 1, 18, 56, 8, 36],
}

#: edge-ablation tolerance of the companion: held-out accuracy within 0.1%
EDGE_TOLERANCE = 0.001

BUDGETS = {
    # pairs for the statistics, held-out pairs for the ablations, largest k measured densely, probes,
    # bases whose graphs and edges are computed, and the LLC: pairs, minibatch, nβ ("p2" = the p² inputs of the
    # task), localizations γ, chains, and per selection the calibration grid's step sizes and chain length.
    # The full budget's LLC settings come from the calibration in benchmarks/RESULTS.md ("LLC calibration of the
    # modular-addition model"), found with calibrate_llc for the weight-decay-3.0 model shipped then: both cells
    # of each grid converged and flat at γ = 300; λ̂ still depends on γ, so it is quoted with γ and nβ. The MLP's
    # chains were lengthened to 6400 / 3200 when two seeds' MLP traces still drifted at 3200 / 1200. Every cell
    # of the three weight-decay-1.0 seeds (the shipped model is seed 0) converged with these settings.
    "full": dict(n_stats=None, n_test=None, dense_keep=40, top_k=16, n_probes=8, graph_points=4,
                 edge_kinds=["lib", "lib_mse", "pca", "interaction", "interaction_mse"],
                 llc_pairs=512, llc_batch=64, llc_nbeta="p2", llc_gammas=[300.0], llc_chains=4,
                 llc={"model": dict(steps=[2e-6, 2.5e-6], n_steps=3200, n_burnin=2400),
                      "mlp": dict(steps=[5e-6, 1e-5], n_steps=6400, n_burnin=3200)}),
    # the small budget only exercises the code: its chains are far too short to converge
    "small": dict(n_stats=2048, n_test=1024, dense_keep=20, top_k=8, n_probes=4, graph_points=1,
                  edge_kinds=["lib", "lib_mse", "pca"],
                  llc_pairs=128, llc_batch=None, llc_nbeta=None, llc_gammas=[1000.0], llc_chains=2,
                  llc={"model": dict(steps=[1e-6, 3e-6], n_steps=20, n_burnin=5),
                       "mlp": dict(steps=[1e-6, 3e-6], n_steps=20, n_burnin=5)}),
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


def model_info(name: str) -> dict[str, Any]:
    """Where a model given to ``--models`` lives and how it was trained (its ``training_summary.json``)."""
    folder = Path(name) if Path(name).is_dir() else tld.bundled_model_path().parent / name
    info: dict[str, Any] = {"folder": str(folder), "seed": None, "split_seed": None, "weight_decay": None,
                            "steps": None}
    summary = folder / "training_summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        info.update(seed=s.get("seed"), split_seed=s.get("split_seed"), steps=s.get("steps"),
                    weight_decay=(s.get("optimizer") or {}).get("weight_decay"),
                    train_minutes=s.get("train_minutes"))
    return info


def _label(res: dict[str, Any]) -> str:
    info = res.get("info") or {}
    if info.get("seed") is None:
        return res["model"]
    return f"seed {info['seed']} (wd {info['weight_decay']:g})"


class _Setup:
    """The model, its data (its own token file: ``tld.modadd_data`` follows the model) and the batches."""

    def __init__(self, model_name: str, budget: dict[str, Any], seed: int) -> None:
        self.model = tld.load_model(model_name)
        self.every = tld.modadd_data(self.model)
        self.p = self.every.p
        self.test = tld.modadd_data(self.model, split="test")
        self.gen = torch.Generator().manual_seed(seed)
        every, test = self.every, self.test
        self.stats_tokens = every.tokens if budget["n_stats"] is None else every.tokens[
            torch.randperm(len(every), generator=self.gen)[: budget["n_stats"]].sort().values]
        self.test_tokens = test.tokens if budget["n_test"] is None else test.tokens[
            torch.randperm(len(test), generator=self.gen)[: budget["n_test"]].sort().values]
        self.data = tld.token_batches(self.model, self.stats_tokens, batch_size=1024, count="all", outputs="last")
        self.test_data = tld.token_batches(self.model, self.test_tokens, batch_size=2048, count="all",
                                           outputs="last")
        # the pair into the logits: the answer position only, at both ends
        self.data_last = tld.token_batches(self.model, self.stats_tokens, batch_size=1024, count="last",
                                           outputs="last")
        self.test_data_last = tld.token_batches(self.model, self.test_tokens, batch_size=2048, count="last",
                                                outputs="last")


def run(model_name: str, budget: dict[str, Any], *, seed: int = 0, save: Any = None,
        llc: bool = True) -> dict[str, Any]:
    """Everything the table needs, for one model (see the module docstring).

    ``save(partial_results)`` (optional) is called after every stage, so a long run leaves what it finished.
    ``llc=False`` leaves the LLC out (:func:`run_llc` adds it later).
    """
    save = save or (lambda _res: None)
    t_start = time.perf_counter()
    su = _Setup(model_name, budget, seed)
    model, data, test_data, p = su.model, su.data, su.test_data, su.p
    res: dict[str, Any] = {"model": model_name, "info": model_info(model_name), "p": p,
                           "test_accuracy": su.test.accuracy(model), "n_stats_pairs": int(su.stats_tokens.shape[0]),
                           "n_test_pairs": int(su.test_tokens.shape[0]), "budget": budget}
    _log(f"model {model_name}: p = {p}, held-out accuracy {res['test_accuracy']:.4f}")

    # statistics: KL metric (top-k estimator) with the neuron synchronisation sums; MSE metric (exact: the
    # identity metric on the p answer logits costs p backward passes per batch)
    stats = tld.collect(model, data, sites=[*SITES, MLP_SITE], jacobian="kl", estimator="topk",
                        top_k=budget["top_k"], n_probes=budget["n_probes"], seed=seed, neuron_sync=True,
                        sync_layers=[0], progress=False)
    stats_mse = tld.collect(model, data, sites=list(SITES), jacobian="mse", estimator="exact", seed=seed,
                            progress=False, allow_expensive=True)
    _log("statistics collected (kl, mse)")
    bases: dict[str, dict[str, Any]] = {"interaction": tld.interaction_bases(stats, sites=list(SITES)),
                                        "interaction_mse": tld.interaction_bases(stats_mse, sites=list(SITES))}
    bases["pca"] = {s: tld.pca_basis(stats.gram(s, centered=True), mean=stats.mean(s)) for s in SITES}
    lib_sites = list(SITES)
    try:
        for kind, st in (("lib", stats), ("lib_mse", stats_mse)):
            bases[kind] = tld.local_interaction_bases(model, data, lib_sites, stats=st,
                                                      n_probes=budget["n_probes"], seed=seed)
        res["lib_note"] = None
    except tld.BadInputError as err:  # TransformerLens 4.x: resid_mid cannot be cut
        lib_sites = [SITES[0], SITES[2]]
        for kind, st in (("lib", stats), ("lib_mse", stats_mse)):
            bases[kind] = tld.local_interaction_bases(model, data, lib_sites, stats=st,
                                                      n_probes=budget["n_probes"], seed=seed)
        res["lib_note"] = f"LIB chain resid_pre → resid_post only ({err})"
    res["lib_sites"] = lib_sites
    _log("bases built")

    # node ablation: directions needed for the held-out accuracy within 1%
    res["sites"] = {}
    all_tokens = su.every.tokens
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

    # graphs of the kept directions; edges needed (edge ablation, held-out accuracy within 0.1%) and modules
    res["edges"], res["modules"] = {}, {}
    for kind in budget["edge_kinds"]:
        kept = {}
        for site in lib_sites:
            k = res["sites"][site]["needed"][kind]
            kept[site] = _truncate(bases[kind][site], max(k if k is not None else bases[kind][site].dim, 1))
        graph = tld.interaction_graph(model, data, kept, lib_sites, method="integrated",
                                      n_points=budget["graph_points"], estimator="exact")
        pairs = []
        for a, b in zip(lib_sites, lib_sites[1:], strict=False):
            needed = tld.edges_needed(model, test_data, kept, graph, pair=(a, b), tolerance=EDGE_TOLERANCE,
                                      loss="top1", progress=False)
            pairs.append({"pair": f"{SITE_LABELS[a]}→{SITE_LABELS[b]}", "n_edges": needed.n_edges,
                          "n_total": needed.n_total, "dims": needed.meta["dims"], "probed": needed.probed,
                          "top1": [float(x) for x in needed.loss]})
        pairs.append(_edges_into_logits(su, kept[SITES[2]], budget))
        res["edges"][kind] = {"pairs": pairs, "total": sum(x["n_edges"] for x in pairs),
                              "total_before_logits": sum(x["n_edges"] for x in pairs[:-1])}
        res["modules"][kind] = _modules(graph, res, kind, lib_sites, seed)
        _log(f"{kind}: edges needed {[x['n_edges'] for x in pairs]}, modules {res['modules'][kind]['n_modules']}, "
             f"AMI {res['modules'][kind]['ami']}")
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
    if llc:
        res["llc"] = run_llc(model_name, budget, seed=seed, setup=su)
        save(res)
    res["seconds"] = time.perf_counter() - t_start
    return res


def _edges_into_logits(su: _Setup, kept: Any, budget: dict[str, Any]) -> dict[str, Any]:
    """Edges needed from the kept directions before the unembedding to the logits (identity basis), at the
    answer position: the companion's third pair."""
    u, ident = SITES[2], tld.identity_basis(su.p)
    bases = {u: kept, LOGITS: ident}
    graph = tld.interaction_graph(su.model, su.data_last, bases, [u, LOGITS], method="integrated",
                                  n_points=budget["graph_points"], estimator="exact")
    needed = tld.edges_needed(su.model, su.test_data_last, bases, graph, pair=(u, LOGITS),
                              tolerance=EDGE_TOLERANCE, loss="top1", progress=False)
    return {"pair": f"{SITE_LABELS[u]}→{SITE_LABELS[LOGITS]}", "n_edges": needed.n_edges, "n_total": needed.n_total,
            "dims": needed.meta["dims"], "probed": needed.probed, "top1": [float(x) for x in needed.loss]}


def _modules(graph: Any, res: dict[str, Any], kind: str, sites: list[str], seed: int) -> dict[str, Any]:
    """Modules of a graph (ε = 1e-3 × its largest edge) and their AMI with the nodes' leading frequencies."""
    top_edge = max(float(e.max()) for e in graph.edges.values())
    eps = 1e-3 * top_edge
    mods = tld.find_modules(graph, eps=eps, seed=seed)
    mod_labels, freq_labels = [], []
    for site in sites:
        lead = res["sites"][site]["fourier"][kind]["leading"]
        for i, module in enumerate(mods.labels[site].tolist()):
            if i < len(lead) and lead[i]["fraction"] >= CLEAR:
                mod_labels.append(module)
                freq_labels.append(lead[i]["frequency"])
    return {"eps": eps, "eps_rule": "1e-3 x the largest edge", "n_modules": mods.n_modules, "cost": mods.cost,
            "labels": {s: mods.labels[s].tolist() for s in sites}, "n_clear_nodes": len(mod_labels),
            "ami": adjusted_mutual_information(mod_labels, freq_labels) if len(mod_labels) >= 2 else None}


def run_llc(model_name: str, budget: dict[str, Any], *, seed: int = 0, setup: Any = None) -> dict[str, Any]:
    """The KL behavioral LLC of the whole model and of the MLP alone: ``calibrate_llc`` over the budget's grid,
    its verdicts and, where a cell converged, the recommended estimate."""
    su = setup or _Setup(model_name, budget, seed)
    model, every = su.model, su.every
    gen = torch.Generator().manual_seed(seed)  # a fresh generator: the same pairs whatever ran before
    llc_tokens = every.tokens[torch.randperm(len(every), generator=gen)[: budget["llc_pairs"]]]
    llc_data = tld.token_batches(model, llc_tokens, batch_size=budget.get("llc_batch") or len(llc_tokens),
                                 count="all", outputs="last")
    nbeta = float(len(every) if budget["llc_nbeta"] == "p2" else budget["llc_nbeta"] or len(llc_tokens))
    out = {}
    for name, params in (("model", "all"), ("mlp", "blocks.0.mlp")):
        grid = budget["llc"][name]
        cal = tld.calibrate_llc(model, llc_data, step_sizes=grid["steps"], localizations=budget["llc_gammas"],
                                nbeta=nbeta, n_steps=grid["n_steps"], n_burnin=grid["n_burnin"],
                                n_chains=budget["llc_chains"], params=params, loss="kl", seed=seed, progress=False)
        out[name] = {"params": params, "nbeta": nbeta, "n_pairs": len(llc_tokens),
                     "batch_size": budget.get("llc_batch") or len(llc_tokens), "n_steps": grid["n_steps"],
                     "n_burnin": grid["n_burnin"], "recommended": cal.recommended, "reason": cal.reason,
                     "cells": cal.rows()}
        _log(f"LLC {name}: {cal.recommended} ({cal.reason})")
    return out


# ---------------------------------------------------------------------------------------------------------
# the table
# ---------------------------------------------------------------------------------------------------------
def _fmt(x: Any, spec: str = "") -> str:
    return "n/a" if x is None else format(x, spec)


def mean_sd(values: list[float | int | None], digits: int = 1) -> str:
    """``mean ± sd`` (sample standard deviation over seeds) of the values that exist; ``n/a`` if none."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    if len(xs) == 1:
        return f"{m:.{digits}f}"
    sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


KIND_NAMES = {"lib": "LIB (kl)", "lib_mse": "LIB (mse)", "interaction": "global IB (kl)",
              "interaction_mse": "global IB (mse)", "pca": "PCA"}


def table(results: list[dict[str, Any]]) -> str:
    """Markdown: our seeds (each, and mean ± sd) beside the companion's published figures."""
    labels = [_label(r) for r in results]
    which = "; ".join(f"{lab}: {r['model']}" for lab, r in zip(labels, results, strict=True))
    lines = [f"Seeds: {len(results)} ({which}). "
             f"Companion: 5 seeds, directions out of {PAPER['of']} (with the constant direction; ours are "
             "centred, out of 128). The companion's metric is the identity on the logits (our `mse`).", "",
             "### Directions needed (held-out top-1 answers changed on ≤ 1% of pairs)", "",
             "| site | basis | ours, per seed | ours, mean ± sd | companion, 5 seeds (mean) | our dims | "
             "mean top-frequency share of kept directions | kept directions with a clear frequency |",
             "|---|---|---|---|---|---|---|---|"]
    for site in SITES:
        label = SITE_LABELS[site]
        for kind in KIND_NAMES:
            if not any(kind in r["sites"][site]["needed"] for r in results):
                continue
            ours = [r["sites"][site]["needed"].get(kind) for r in results]
            paper = PAPER["directions_needed"].get(kind.replace("_mse", ""), {}).get(label) \
                if kind in ("lib_mse", "pca") else None
            four = [r["sites"][site]["fourier"].get(kind) for r in results]
            dims = [r["sites"][site]["dims"].get(kind) for r in results]
            share = "/".join(_fmt(f and f["mean_top_fraction"], ".2f") for f in four)
            clear = "/".join("n/a" if f is None else f"{f['n_clear']}" for f in four)
            ptxt = f"{'/'.join(map(str, paper))} ({sum(paper) / len(paper):.1f})" if paper else "—"
            lines.append(f"| {label} | {KIND_NAMES[kind]} | {'/'.join(_fmt(x) for x in ours)} | {mean_sd(ours)} | "
                         f"{ptxt} | {'/'.join(_fmt(d) for d in dims)} | {share} | {clear} |")
    lines += ["", "The companion's LIB and PCA columns are set beside our `mse` LIB and PCA (their metric).", "",
              "### Edges needed (edge ablation by bisection, held-out top-1 answers changed on ≤ 0.1% of pairs)", "",
              "Graph of each basis with its kept directions as nodes (integrated gradients); the third pair ends at "
              "the logits in their own coordinates (identity basis, answer position only), as the companion's "
              "output node layer. Totals are over the three pairs, and over the first two beside them.", "",
              "| pair | basis | ours, per seed (of k_A·k_B) | ours, mean ± sd | companion, mean of 5 |",
              "|---|---|---|---|---|"]
    kinds = [k for k in KIND_NAMES if any(k in (r.get("edges") or {}) for r in results)]
    pair_names = []
    for r in results:
        for k in kinds:
            for x in r.get("edges", {}).get(k, {}).get("pairs", []):
                if x["pair"] not in pair_names:
                    pair_names.append(x["pair"])
    for pair in pair_names:
        for kind in kinds:
            vals, cells = [], []
            for r in results:
                x = next((x for x in r.get("edges", {}).get(kind, {}).get("pairs", []) if x["pair"] == pair), None)
                vals.append(None if x is None else x["n_edges"])
                cells.append("n/a" if x is None else f"{x['n_edges']} ({x['n_total']})")
            paper = _paper_edges(kind)
            lines.append(f"| {pair} | {KIND_NAMES[kind]} | {' / '.join(cells)} | {mean_sd(vals)} | "
                         f"{paper.get(pair, '—') if paper else '—'} |")
    for name, key, pairs in (("total", "total", list(_PAIR_NAMES)),
                             ("total before the logits", "total_before_logits", list(_PAIR_NAMES)[:2])):
        for kind in kinds:
            totals = [_edge_total(r, kind, key) for r in results]
            if all(t is None for t in totals):
                continue
            paper = _paper_edges(kind)
            ptxt = f"{sum(paper[x] for x in pairs):.1f}" if paper else "—"
            lines.append(f"| {name} | {KIND_NAMES[kind]} | {' / '.join(_fmt(t) for t in totals)} | "
                         f"{mean_sd(totals)} | {ptxt} |")

    lines += ["", "### Leading frequencies of the kept directions (in order of the basis), seed by seed", ""]
    for lab, r in zip(labels, results, strict=True):
        for site in SITES:
            for kind in ("lib", "lib_mse", "pca"):
                f = r["sites"][site]["fourier"].get(kind)
                if f:
                    fr = ", ".join(f"{d['frequency']} ({d['fraction']:.2f})" for d in f["leading"])
                    lines.append(f"- {lab} {SITE_LABELS[site]} {KIND_NAMES[kind]}: {fr}")
    lines.append(f"- companion seed 0 ln1.0 (LIB): {', '.join(map(str, PAPER['seed0_ln1.0_frequencies']))}")
    lines += ["", "### Modules, neurons, LLC", "", "| quantity | " + " | ".join(labels) + " | mean ± sd |",
              "|---|" + "---|" * (len(results) + 1)]

    def row(name: str, get: Any, num: Any = None, digits: int = 1) -> None:
        cells = [get(r) for r in results]
        agg = mean_sd([num(r) for r in results], digits) if num else ""
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {agg} |")

    row("held-out accuracy", lambda r: f"{r['test_accuracy']:.4f}")
    row("training steps", lambda r: _fmt((r.get("info") or {}).get("steps")))
    for kind in [k for k in KIND_NAMES if any(k in (r.get("modules") or {}) for r in results)]:
        row(f"modules, {KIND_NAMES[kind]} graph (ε = 1e-3·max edge)",
            lambda r, k=kind: _fmt((r["modules"].get(k) or {}).get("n_modules")),
            lambda r, k=kind: (r["modules"].get(k) or {}).get("n_modules"))
        row(f"AMI(module, frequency), {KIND_NAMES[kind]}, over clear nodes",
            lambda r, k=kind: f"{_fmt((r['modules'].get(k) or {}).get('ami'), '.2f')} "
                              f"({(r['modules'].get(k) or {}).get('n_clear_nodes')} nodes)",
            lambda r, k=kind: (r["modules"].get(k) or {}).get("ami"), digits=2)
    row("neurons with a clear frequency / alive", lambda r: f"{r['neuron_sync']['n_clear_neurons']} / "
        f"{r['neuron_sync']['n_alive']}", lambda r: r["neuron_sync"]["n_clear_neurons"])
    row("neuron frequencies (count)", lambda r: ", ".join(f"{k}: {v}" for k, v in
                                                          r["neuron_sync"]["neuron_frequencies"].items()))
    row("neuron_sync blocks of ≥ 2 sharing one frequency (τ: blocks)", lambda r: "; ".join(
        f"τ={t['tau']:.2g}: {t['blocks_one_frequency']}/{t['n_blocks']}"
        for t in r["neuron_sync"]["per_tau"][:: max(1, len(r["neuron_sync"]["per_tau"]) // 5)]))
    for name in ("model", "mlp"):
        row(f"KL LLC, {name}", lambda r, name=name: _llc((r.get("llc") or {}).get(name)),
            lambda r, name=name: ((((r.get("llc") or {}).get(name) or {}).get("recommended")) or {}).get("llc"),
            digits=2)
    return "\n".join(lines) + "\n"


_PAIR_NAMES = tuple(PAPER["edges_needed_mean"]["lib"])  # the companion's three pairs, in forward order


def _edge_total(res: dict[str, Any], kind: str, key: str) -> int | None:
    """A run's total edges needed over the three pairs (``total``) or the first two; runs recorded before the
    pair into the logits existed have only the latter (their ``total``)."""
    edges = (res.get("edges") or {}).get(kind)
    if edges is None:
        return None
    if "total_before_logits" not in edges:  # no pair into the logits in this run
        return edges["total"] if key == "total_before_logits" else None
    return edges[key]


def _paper_edges(kind: str) -> dict[str, float] | None:
    """The companion's mean edges needed per pair for our basis of the same kind (their metric: our ``mse``)."""
    return PAPER["edges_needed_mean"].get(kind.replace("_mse", "")) if kind in ("lib_mse", "pca") else None


def _llc(entry: dict[str, Any] | None) -> str:
    if entry is None:
        return "not run"
    cells = entry["cells"]
    verdicts = ", ".join(f"ε={c['step_size']:g} γ={c['localization']:g}: {c['verdict'].split(';')[0]}"
                         for c in cells)
    rec = entry["recommended"]
    if rec is None:
        return f"no recommendation: {entry['reason']} [{verdicts}]"
    return (f"{rec['llc']:.1f} ± {rec['llc_se']:.1f} (ε = {rec['step_size']:g}, γ = {rec['localization']:g}, "
            f"nβ = {entry['nbeta']:g}) [{verdicts}]")


def _environment() -> dict[str, Any]:
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch": torch.__version__, "tl_degeneracy": tld.__version__,
            "transformer_lens": _tl_version(), "threads": torch.get_num_threads(), "load": os.getloadavg(),
            "command": " ".join(sys.argv)}


def _tl_version() -> str:
    from importlib.metadata import version

    return version("transformer-lens")


def _write(out: Path, results: list[dict[str, Any]], env: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps({"env": env, "results": results}, indent=1))
    (out / "table.md").write_text(table(results))


def _join_llc(results: list[dict[str, Any]], sources: list[Path]) -> list[dict[str, Any]]:
    """Each result's LLC from the entry of ``sources`` whose model has the same weights (by fingerprint: the
    same weights under another path are the same model); a result with no such entry is refused. Returns the
    sources' environments (where and when the LLC ran), for the output's ``env``."""
    loaded = [json.loads(path.read_text()) for path in sources]
    donors = [r for one in loaded for r in one["results"] if r.get("llc")]
    prints: dict[str, str] = {}

    def fingerprint(name: str) -> str:
        if name not in prints:
            prints[name] = tld.ModelAdapter(tld.load_model(name)).weights_fingerprint()
        return prints[name]

    for res in results:
        match = next((d for d in donors if fingerprint(d["model"]) == fingerprint(res["model"])), None)
        if match is None:
            raise SystemExit(f"--llc-from: no LLC there for the weights of {res['model']}; run --llc-into on it")
        res.update(llc=match["llc"], llc_seconds=match.get("llc_seconds"), llc_budget=match.get("llc_budget"),
                   llc_source={"model": match["model"], "weights": fingerprint(res["model"])})
    return [env for one in loaded for env in (one["env"] if isinstance(one["env"], list) else [one["env"]])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["modadd-113"],
                    help="bundled model names or train_modadd.py model folders, one per seed (default: the "
                         "shipped modadd-113); each model's own token file (beside its folder) is used")
    ap.add_argument("--small", action="store_true", help="the test suite's small budget (≈ 1 min)")
    ap.add_argument("--no-llc", action="store_true", help="leave the LLC out (add it later with --llc-into)")
    ap.add_argument("--llc-into", type=Path, default=None,
                    help="a results.json: (re)compute only the LLC of each of its models and write the result "
                         "into --out")
    ap.add_argument("--combine", type=Path, nargs="+", default=None,
                    help="results.json files of runs made separately (e.g. one seed each): one table of all")
    ap.add_argument("--llc-from", type=Path, nargs="+", default=None,
                    help="results.json files of --llc-into runs: each model's LLC is taken from the entry with the "
                         "same weights (compared by fingerprint) instead of being computed")
    ap.add_argument("--out", type=Path, required=True, help="folder for results.json and table.md")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    budget = BUDGETS["small" if args.small else "full"]
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict[str, Any]] = []
    if args.combine:
        envs = []
        for path in args.combine:
            loaded = json.loads(path.read_text())
            results += loaded["results"]
            envs += loaded["env"] if isinstance(loaded["env"], list) else [loaded["env"]]
        if args.llc_from:
            envs += _join_llc(results, args.llc_from)
        _write(args.out, results, envs)
        print(table(results))
        return 0
    if args.llc_into:
        loaded = json.loads(args.llc_into.read_text())
        envs = loaded["env"] if isinstance(loaded["env"], list) else [loaded["env"]]
        for res in loaded["results"]:
            start = time.perf_counter()
            res["llc"] = run_llc(res["model"], budget)
            res["llc_seconds"] = time.perf_counter() - start
            res["llc_budget"] = {k: v for k, v in budget.items() if k.startswith("llc")}
            results.append(res)
        _write(args.out, results, [*envs, {**_environment(), "part": "llc"}])
        print(table(results))
        return 0

    def save(partial: dict[str, Any]) -> None:
        (args.out / "partial.json").write_text(json.dumps({"done": results, "running": partial}, indent=1))

    for m in args.models:
        results.append(run(m, budget, save=save, llc=not (args.no_llc or args.llc_from)))
    env: Any = _environment()
    if args.llc_from:
        env = [env, *_join_llc(results, args.llc_from)]
    _write(args.out, results, env)
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
