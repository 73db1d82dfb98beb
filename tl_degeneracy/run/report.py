"""Tables, plots and the ``index.md`` of a run folder, drawn from saved results only (no model needed).

Every plot function takes result objects (as the analyses return them, or as :func:`load_results` reads them
back) and returns a :class:`matplotlib.figure.Figure` built without ``pyplot``, so it works under any
backend, in scripts and in notebooks (a notebook displays the returned figure). :func:`write_report`
draws everything a ``tl-degeneracy run`` folder holds and writes the summary table and ``index.md``.

Example::

    import tl_degeneracy as tld
    res = tld.report.load_results("runs/demo")
    fig = tld.report.plot_spectra(res.bases, res.pca)      # Λ spectra against PCA variances, per layer
    fig.savefig("spectra.png")
    tld.report.write_report("runs/demo")                    # redraw tables, plots and index.md

Folder layout read here (written by the stages in :mod:`tl_degeneracy.pipeline`)::

    stats.json                                   metadata of the streamed statistics
    bases/{site}.interaction.{safetensors,json}  InteractionBasis.save
    bases/{site}.pca.{safetensors,json}
    sync/summary.json                            blocks and degrees of freedom at τ, τ sweeps, per layer
    sync/{heads,neurons}.layer{l}.safetensors    HeadSync.save / NeuronSync.save
    llc/summary.json                             which selections and sweep the llc stage saved
    llc/{selection}/                             LLCResult.save, one folder per parameter selection
    llc/scale/                                   LLCScaleSweep.save: one LLCResult per nβ
    ablation/{site}.{interaction,pca}.*          AblationCurve.save (ablate stage)
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

from tl_degeneracy._io import atomic_write, read_json, tensor_path
from tl_degeneracy.analysis.ablation import directions_needed
from tl_degeneracy.analysis.basis import InteractionBasis
from tl_degeneracy.analysis.graph import InteractionGraph, Modules, find_modules
from tl_degeneracy.analysis.sync import HeadSync
from tl_degeneracy.collection.ablation import AblationCurve
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.llc import LLCResult, LLCScaleSweep
from tl_degeneracy.methods.edge_ablation import EdgesNeeded
from tl_degeneracy.run.layout import RunFolder
from tl_degeneracy.sites import SITE_KINDS, site_kind, site_layer

__all__ = [
    "RunResults",
    "SUMMARY_COLUMNS",
    "architectural_ceiling",
    "token_ceiling",
    "load_results",
    "plot_ablation_curves",
    "plot_dim_curves",
    "plot_dims",
    "plot_head_sync",
    "plot_llc_scale",
    "plot_llc_traces",
    "plot_spectra",
    "plot_sync_sweeps",
    "summary_markdown",
    "summary_rows",
    "write_report",
    "write_summary",
]

#: columns of the summary table (one row per site), in order, with their Markdown headers
SUMMARY_COLUMNS: dict[str, str] = {
    "layer": "layer",
    "site": "site",
    "d": "d",
    "rank_G": "rank G",
    "ib_dim": "IB dim",
    "pca_dim": "PCA dim",
    "top_lambda": "top Λ",
    "ib_needed": "directions needed (interaction)",
    "pca_needed": "directions needed (PCA)",
    "G_ceiling": "rank G ≤ (tokens)",
    "M_ceiling": "IB dim ≤ (architecture)",
    "head_blocks": "head blocks",
    "head_extra_dof": "head extra dof",
    "neuron_blocks": "neuron blocks",
    "neuron_extra_dof": "neuron extra dof",
    "llc": "LLC (layer)",
    "llc_se": "± s.e.",
    "llc_std": "std over chains",
    "eps_hat": "ε̂",
    "llc_verdict": "LLC verdict",
    "lib_edges_needed": "edges needed → next (local)",
    "ib_edges_needed": "edges needed → next (interaction)",
    "pca_edges_needed": "edges needed → next (PCA)",
    "edges_total": "edges → next (all)",
}

_DPI = 110
_KIND_ORDER = {k: i for i, k in enumerate(SITE_KINDS)}


# ---------------------------------------------------------------------------------------------------------
# reading a run folder
# ---------------------------------------------------------------------------------------------------------
@dataclass
class RunResults:
    """Everything a run folder holds, as result objects; a part is empty when its stage has not run.

    Attributes:
        folder: the run folder.
        bases: site -> interaction :class:`~tl_degeneracy.basis.InteractionBasis`.
        pca: site -> PCA basis (same class, ``kind="pca"``).
        sync: the sync stage's ``summary.json`` (τ, measure, per layer: blocks, degrees of freedom, sweeps).
        head_sync: layer -> :class:`~tl_degeneracy.analysis.sync.HeadSync` read back from ``sync/heads.layer{l}``.
        llc: parameter selection ("all", "blocks.0", ...) -> :class:`~tl_degeneracy.llc.LLCResult`.
        llc_scale: the scale sweep (``LLCScaleSweep.results``), one LLCResult per nβ, ascending nβ.
        stats_meta: metadata of the streamed statistics (model, data, sites, settings).
        run: ``run.json`` (command, arguments, versions, timings, machine).
        stages: stage name -> the marker a finished stage left (settings, inputs, outputs, seconds).
        graph: the graph stage's :class:`~tl_degeneracy.InteractionGraph` (LIB coordinates), or None.
        ablation: site -> {basis kind -> :class:`~tl_degeneracy.AblationCurve`} (ablate stage).
        edges_needed: basis kind -> :class:`~tl_degeneracy.EdgesNeeded` of the graph stage's first pair.
    """

    folder: Path
    bases: dict[str, InteractionBasis] = field(default_factory=dict)
    pca: dict[str, InteractionBasis] = field(default_factory=dict)
    sync: dict[str, Any] | None = None
    head_sync: dict[int, Any] = field(default_factory=dict)
    llc: dict[str, Any] = field(default_factory=dict)
    llc_scale: list[Any] = field(default_factory=list)
    stats_meta: dict[str, Any] | None = None
    run: dict[str, Any] | None = None
    stages: dict[str, Any] = field(default_factory=dict)
    graph: InteractionGraph | None = None
    ablation: dict[str, dict[str, Any]] = field(default_factory=dict)
    edges_needed: dict[str, Any] = field(default_factory=dict)

    @property
    def ablation_tolerance(self) -> float | None:
        """The KL tolerance of the "directions needed" columns (the ablate stage's setting)."""
        tol = ((self.stages.get("ablate") or {}).get("settings") or {}).get("tolerance")
        return None if tol is None else float(tol)

    @property
    def sites(self) -> list[str]:
        """Sites with results, ordered by layer then site kind."""
        names = set(self.bases) | set(self.pca) | set((self.stats_meta or {}).get("sites", []))
        return sort_sites(names)

    @property
    def empty(self) -> bool:
        return not (self.bases or self.pca or self.sync or self.llc or self.llc_scale or self.stats_meta)

    def to_dataframe(self) -> Any:
        """The summary table (:func:`summary_rows`, columns :data:`SUMMARY_COLUMNS`) as a ``pandas.DataFrame``.

        Needs pandas (``pip install pandas``). Example::

            df = tld.report.load_results("runs/demo").to_dataframe()
            df[["site", "rank_G", "G_ceiling", "ib_dim", "M_ceiling", "pca_dim"]]
        """
        try:
            import pandas as pd
        except ImportError as err:
            raise ImportError("to_dataframe() needs pandas, which is not installed: pip install pandas") from err
        return pd.DataFrame(summary_rows(self), columns=list(SUMMARY_COLUMNS))


def sort_sites(names: Sequence[str] | set[str]) -> list[str]:
    """Sites by layer (sites outside the blocks last), then by SPEC site kind."""
    def key(name: str) -> tuple[int, int, str]:
        layer = site_layer(name)
        return (10**9 if layer is None else layer, _KIND_ORDER.get(site_kind(name) or "", 99), name)

    return sorted(names, key=key)


def load_results(folder: str | os.PathLike) -> RunResults:
    """Read every saved result of a run folder (see the module docstring for the layout)."""
    run = RunFolder(folder)
    if not run.root.is_dir():
        raise BadInputError(f"run folder '{run.root}' does not exist")
    res = RunResults(folder=run.root)
    if run.stats_json.is_file():
        res.stats_meta = read_json(run.stats_json)
    if run.run_json.is_file():
        res.run = read_json(run.run_json)
    for path in sorted(run.markers.glob("*.json")):
        res.stages[path.stem] = read_json(path)
    for site, path in run.saved_bases("interaction").items():
        res.bases[site] = InteractionBasis.load(path)
    for site, path in run.saved_bases("pca").items():
        res.pca[site] = InteractionBasis.load(path)
    if run.graph_result.is_file() and run.graph_result.with_suffix(".json").is_file():
        res.graph = InteractionGraph.load(run.graph_result)
    for kind, path in run.saved_edges_needed().items():
        if path.with_suffix(".json").is_file():
            res.edges_needed[kind] = EdgesNeeded.load(path)
    for kind in ("interaction", "pca"):
        for site, path in run.saved_ablation_curves(kind).items():
            res.ablation.setdefault(site, {})[kind] = AblationCurve.load(path)
    if run.sync_summary.is_file():
        res.sync = read_json(run.sync_summary)
        for layer in res.sync.get("layers", {}):
            path = tensor_path(run.sync_result("heads", layer))
            if path.is_file():
                res.head_sync[int(layer)] = HeadSync.load(path)
    if run.llc_summary.is_file():
        summary = read_json(run.llc_summary)
        for selection, sub in summary.get("selections", {}).items():
            res.llc[selection] = LLCResult.load(run.llc / sub)
        if summary.get("scale"):
            res.llc_scale = sorted(LLCScaleSweep.load(run.llc / summary["scale"]).results, key=lambda r: r.nbeta)
    return res


# ---------------------------------------------------------------------------------------------------------
# the summary table
# ---------------------------------------------------------------------------------------------------------
#: site kinds whose activation reaches the output only through a fixed linear map into the residual stream (or
#: are the residual stream): the rank of their Jacobian Gram M is at most d_model
_THROUGH_RESIDUAL = ("resid_pre", "resid_mid", "resid_post", "mlp_post", "attn_z", "ln_final")


def architectural_ceiling(site: str, d: int, d_model: int | None) -> int:
    """Upper bound on the rank of M, hence on the interaction-basis dimension, set by the architecture.

    The output depends on a site only through the narrowest layer after it: ``mlp_post`` and ``attn_z`` feed
    the residual stream through a fixed matrix (W_out, W_O), so rank M ≤ d_model even when d = d_mlp; residual
    sites have d = d_model. ``mlp_pre`` passes an elementwise nonlinearity whose slope differs per token first,
    so only d bounds it. A dimension at this ceiling says little about degeneracy.

    Example: ``architectural_ceiling("blocks.0.mlp.hook_post", 512, 128) == 128``.
    """
    kind = site_kind(site)
    if d_model is None or kind not in _THROUGH_RESIDUAL:
        return d
    return min(d, d_model)


def token_ceiling(d: int, n_tokens: int | None, *, centered: bool = True) -> int:
    """Upper bound on the rank of G from the number of counted tokens: a centred Gram of N tokens has rank ≤ N − 1.

    Example: ``token_ceiling(3072, 2048) == 2047`` (too few tokens to see all 3072 directions).
    """
    if n_tokens is None:
        return d
    return max(0, min(d, n_tokens - (1 if centered else 0)))


def summary_rows(results: RunResults) -> list[dict[str, Any]]:
    """One row per site (see :data:`SUMMARY_COLUMNS`); a value is ``None`` when its stage has not run.

    Per-layer columns (synchronisation at the sync stage's τ, the LLC of the layer's parameters
    ``blocks.{l}``) repeat on every site of the layer.
    """
    rows = []
    d_model = (results.stats_meta or {}).get("model", {}).get("d_model")
    n_tokens = (results.stats_meta or {}).get("n_tokens")
    layer_sync = (results.sync or {}).get("layers", {})
    for site in results.sites:
        layer = site_layer(site)
        ib, pca = results.bases.get(site), results.pca.get(site)
        sync = layer_sync.get(str(layer), {}) if layer is not None else {}
        heads, neurons = sync.get("heads"), sync.get("neurons")
        llc = results.llc.get(f"blocks.{layer}") if layer is not None else None
        curves = results.ablation.get(site, {})
        tol = results.ablation_tolerance
        needed = {kind: directions_needed(curves[kind], tol) if kind in curves and tol is not None else None
                  for kind in ("interaction", "pca")}
        d = ib.input_dim if ib is not None else (pca.input_dim if pca is not None else None)
        edges = {kind: e for kind, e in results.edges_needed.items() if e.pair[0] == site}
        rows.append({
            "layer": "final" if layer is None else layer,
            "site": site,
            "d": d,
            "rank_G": ib.rank_G if ib is not None else (pca.rank_G if pca is not None else None),
            "G_ceiling": token_ceiling(d, n_tokens) if d is not None else None,
            "ib_dim": ib.dim if ib is not None else None,
            "M_ceiling": architectural_ceiling(site, d, d_model) if d is not None else None,
            "pca_dim": pca.dim if pca is not None else None,
            "top_lambda": float(ib.all_lambdas[0]) if ib is not None and ib.all_lambdas.numel() else None,
            "ib_needed": needed["interaction"],
            "pca_needed": needed["pca"],
            "head_blocks": len(heads["dof"]["blocks"]) if heads else None,
            "head_extra_dof": heads["dof"]["extra"] if heads else None,
            "neuron_blocks": len(neurons["dof"]["blocks"]) if neurons else None,
            "neuron_extra_dof": neurons["dof"]["extra"] if neurons else None,
            "llc": llc.llc_mean if llc is not None else None,
            "llc_se": llc.llc_se if llc is not None else None,
            "llc_std": llc.llc_std if llc is not None else None,
            "eps_hat": llc.eps_hat if llc is not None else None,
            "llc_verdict": llc.verdict if llc is not None else None,
            "lib_edges_needed": edges["local"].n_edges if "local" in edges else None,
            "ib_edges_needed": edges["interaction"].n_edges if "interaction" in edges else None,
            "pca_edges_needed": edges["pca"].n_edges if "pca" in edges else None,
            "edges_total": "/".join(str(edges[k].n_total) for k in ("local", "interaction", "pca") if k in edges)
            or None,
        })
    return rows


def _edges_needed_paragraph(needed: Mapping[str, Any]) -> str:
    """The graph section's sentence and table on the edges needed per basis (empty without results)."""
    if not needed:
        return ""
    first = next(iter(needed.values()))
    lines = ["", f"Edges needed on {first.pair[0]} → {first.pair[1]}: the fewest strongest edges whose keeping "
             f"(every other edge removed by patching the next site's basis coordinates, removed sources at their "
             f"mean) keeps the KL within {first.tolerance:g} of the unablated model, by bisection on "
             f"{first.n_tokens} output positions (companion paper's sparsity measure: fewer is sparser).", "",
             "| basis | dims | edges needed | of | fraction |", "|---|---|---|---|---|"]
    for kind, e in needed.items():
        dims = " → ".join(str(k) for k in e.meta["dims"]) if e.meta.get("dims") else "–"
        lines.append(f"| {kind} | {dims} | {e.n_edges} | {e.n_total} | {e.fraction:.3g} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return str(value)


#: marks a value at its ceiling in the Markdown table (the rank of G at the token limit, the interaction-basis
#: dimension at the architectural limit): such a number is set by the set-up, not by the model's degeneracy
CEILING_MARK = " ▲"

_CEILING_OF = {"rank_G": "G_ceiling", "ib_dim": "M_ceiling"}


def _at_ceiling_mark(row: Mapping[str, Any], key: str) -> str:
    ceiling = row.get(_CEILING_OF.get(key, ""))
    value = row.get(key)
    return CEILING_MARK if value is not None and ceiling is not None and value >= ceiling else ""


def summary_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The summary table as GitHub Markdown (numbers to 4 significant digits, ``–`` for not computed).

    A rank of G at the token limit, or an interaction-basis dimension at the architectural limit, is marked
    ``▲`` (:data:`CEILING_MARK`).
    """
    lines = ["| " + " | ".join(SUMMARY_COLUMNS.values()) + " |",
             "|" + "|".join("---" if k == "site" else "---:" for k in SUMMARY_COLUMNS) + "|"]
    for row in rows:
        cells = [f"`{row['site']}`" if k == "site" else _fmt(row.get(k)) + _at_ceiling_mark(row, k)
                 for k in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_summary(rows: Sequence[Mapping[str, Any]], folder: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``summary.csv`` (full precision, empty cell for not computed) and ``summary.md``."""
    folder = Path(folder)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in SUMMARY_COLUMNS})
    run = RunFolder(folder)
    text = buf.getvalue()
    atomic_write(run.summary_csv, lambda tmp: Path(tmp).write_text(text))
    atomic_write(run.summary_md, lambda tmp: Path(tmp).write_text(summary_markdown(rows)))
    return run.summary_csv, run.summary_md


# ---------------------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------------------
def _by_kind(sites: Sequence[str]) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = {}
    for site in sort_sites(list(sites)):
        groups.setdefault(site_kind(site) or site, []).append(site)
    return dict(sorted(groups.items(), key=lambda kv: _KIND_ORDER.get(kv[0], 99)))


def _layer_colors(sites: Sequence[str]) -> dict[str, Any]:
    import matplotlib

    layers = [site_layer(s) for s in sites]
    top = max([x for x in layers if x is not None], default=0)
    cmap, norm = matplotlib.colormaps["viridis"], Normalize(vmin=0, vmax=max(top, 1))
    return {s: cmap(norm(x if x is not None else top)) for s, x in zip(sites, layers, strict=True)}


def _site_label(site: str) -> str:
    layer = site_layer(site)
    return "final" if layer is None else f"layer {layer}"


def _above_floor(values: torch.Tensor, floor: float) -> tuple[np.ndarray, np.ndarray]:
    """(1-based index, value) of the eigenvalues above the float64 noise floor (and above 0, for a log axis)."""
    v = values.detach().cpu().double().numpy()
    idx = np.arange(1, v.size + 1)
    keep = v > max(floor, 0.0)
    return idx[keep], v[keep]


def _positive(values: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    v = values.detach().cpu().double().numpy()
    idx = np.arange(1, v.size + 1)
    keep = v > 0
    return idx[keep], v[keep]


def plot_spectra(bases: Mapping[str, InteractionBasis],
                 pca: Mapping[str, InteractionBasis] | None = None) -> Figure:
    """Interaction-basis spectra Λ (eigenvalues of G·M, paper §6) per layer, above the PCA variances.

    One column per site kind; top row: every eigenvalue of M̃ (``all_lambdas``), descending, on a log scale
    with the kept dimension in the legend; bottom row (when ``pca`` is given): the eigenvalues of the
    activation covariance G. Λ carries the output metric's units (it is invariant under a → R a), the PCA
    variances the activation's units squared, so the two rows share the x axis only. Each spectrum is cut at
    its float64 noise floor (``lambda_floor``), drawn as a dotted line of the same colour: values below it are
    rounding, not data.
    """
    if not bases and not pca:
        raise BadInputError("plot_spectra needs at least one basis")
    groups = _by_kind(list(bases) or list(pca or {}))
    rows = (1 if bases else 0) + (1 if pca else 0)
    fig = Figure(figsize=(5.2 * len(groups), 3.6 * rows), dpi=_DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, len(groups), squeeze=False))
    for col, (kind, sites) in enumerate(groups.items()):
        colors = _layer_colors(sites)
        row = 0
        for source, title, ylabel in ((bases, "interaction Λ (eigenvalues of G·M)", "Λ_i"),
                                      (pca, "PCA variances (eigenvalues of G)", "variance")):
            if not source:
                continue
            ax = axes[row, col]
            for site in sites:
                if site not in source:
                    continue
                basis = source[site]
                x, y = _above_floor(basis.all_lambdas, basis.lambda_floor)
                ax.plot(x, y, color=colors[site], lw=1.3, label=f"{_site_label(site)} (dim {basis.dim})")
                if basis.lambda_floor > 0:  # below this line the eigenvalues are float64 rounding, not data
                    ax.axhline(basis.lambda_floor, color=colors[site], ls=":", lw=0.9, alpha=0.8)
            ax.set_yscale("log")
            ax.set_title(f"{kind}: {title}", fontsize=10)
            ax.set_xlabel("index i (descending)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="major", alpha=0.3)
            ax.legend(fontsize=7, loc="lower left")
            row += 1
    return fig


def plot_interaction_graph(graph: InteractionGraph, modules: Modules | None = None, *, decades: float = 3.0,
                           max_edges: int = 1500) -> Figure:
    """The interaction graph (paper §4–5): sites as columns, one node per basis direction.

    Nodes are sized by Λ (area ∝ Λ / max Λ of the site; uniform when the graph has no ``lambdas``) and
    coloured by module when ``modules`` is given. Edges are drawn with width and opacity by log-normalised
    strength, ``(log E − log E_max) / decades + 1`` clipped to [0, 1], so edges more than ``decades`` orders
    below the strongest are not drawn; at most ``max_edges`` strongest edges per figure.

    Example::

        fig = plot_interaction_graph(graph, tld.find_modules(graph, eps=1e-4)); fig.savefig("graph.png")
    """
    from matplotlib.collections import LineCollection

    if not isinstance(graph, InteractionGraph):
        raise BadInputError(f"plot_interaction_graph takes an InteractionGraph, got {type(graph).__name__}")
    if not (math.isfinite(decades) and decades > 0):
        raise BadInputError(f"decades must be a finite number > 0, got {decades!r}")
    dims = graph.dims
    height = max(dims.values())
    fig = Figure(figsize=(1.9 * len(graph.sites) + 1.5, min(2 + 0.09 * height, 14)), dpi=_DPI,
                 layout="constrained")
    ax = fig.subplots()
    e_max = max((float(E.max()) for E in graph.edges.values() if E.numel()), default=0.0)
    segs, strength = [], []
    if e_max > 0:
        for col, ((_, _), E) in enumerate(graph.edges.items()):
            s = ((E.clamp(min=e_max * 1e-300).log10() - math.log10(e_max)) / decades + 1).clamp(0, 1)
            ii, jj = (s > 0).nonzero(as_tuple=True)
            for i, j in zip(ii.tolist(), jj.tolist(), strict=True):
                segs.append([(col, -i), (col + 1, -j)])
                strength.append(float(s[i, j]))
    if segs:
        order = np.argsort(strength)[-max_edges:]
        st = np.asarray(strength)[order]
        lc = LineCollection([segs[k] for k in order], linewidths=0.2 + 2.3 * st,
                            colors=[(0.15, 0.2, 0.45, 0.1 + 0.8 * v) for v in st], zorder=1)
        ax.add_collection(lc)
    cmap = _cmap("tab20")
    for col, site in enumerate(graph.sites):
        d = dims[site]
        if graph.lambdas is not None and d and float(graph.lambdas[site].max()) > 0:
            lam = graph.lambdas[site].clamp(min=0)
            sizes = (8 + 120 * lam / lam.max()).numpy()
        else:
            sizes = np.full(d, 20.0)
        if modules is not None and site in modules.labels:
            colors = [cmap(int(m) % 20) for m in modules.labels[site].tolist()]
        else:
            colors = ["0.45"] * d
        ax.scatter(np.full(d, col), -np.arange(d), s=sizes, c=colors, edgecolors="k", linewidths=0.3, zorder=2)
    ax.set_xticks(range(len(graph.sites)), [s.removeprefix("blocks.") for s in graph.sites], rotation=30, ha="right",
                  fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.5, len(graph.sites) - 0.5)
    ax.set_ylim(-height + 0.5, 1)
    title = f"interaction graph ({graph.meta.get('method', '?')}, edges ≥ 1e-{decades:g}·max)"
    if modules is not None:
        title += f"; {modules.n_modules} modules, cut cost {modules.cost:.3g} at ε={modules.eps:.3g}"
    ax.set_title(title, fontsize=9)
    for side in ("top", "right", "left"):
        ax.spines[side].set_visible(False)
    return fig


def _cmap(name: str) -> Any:
    from matplotlib import colormaps

    return colormaps[name]


def plot_dims(bases: Mapping[str, InteractionBasis], pca: Mapping[str, InteractionBasis] | None = None,
              *, rtol: float = 1e-3, d_model: int | None = None, n_tokens: int | None = None) -> Figure:
    """Kept dimension per layer: interaction basis against PCA, one panel per site kind.

    Solid bars: the dimension at the tolerance the bases were built with (the summary table's ``IB dim``
    and ``PCA dim``); light bars: the number of eigenvalues above ``rtol`` × the largest (Λ for the
    interaction basis, variances for PCA), a coarser cut that shows how fast each spectrum falls. Black
    ticks mark the rank of G and the dashed line the site's width d. With ``d_model``: red ticks mark the
    architectural ceiling of the interaction-basis dimension (:func:`architectural_ceiling`) and a dotted line
    d_model; with ``n_tokens``: grey ticks mark the token limit of the rank of G (:func:`token_ceiling`) where it
    is below d.
    """
    if not bases:
        raise BadInputError("plot_dims needs interaction bases")
    groups = _by_kind(list(bases))
    fig = Figure(figsize=(5.4 * len(groups), 4.2), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (kind, sites) in zip(axes, groups.items(), strict=True):
        x = np.arange(len(sites))
        ib = [bases[s] for s in sites]
        pb = [pca[s] for s in sites] if pca is not None and all(s in pca for s in sites) else None
        bars = [("interaction", "C0", 1.0, [b.dim for b in ib]),
                (f"interaction, Λ > {rtol:g}·Λ_max", "C0", 0.35, [_count_above(b.all_lambdas, rtol) for b in ib])]
        if pb is not None:
            bars += [("PCA", "C1", 1.0, [b.dim for b in pb]),
                     (f"PCA, variance > {rtol:g}·max", "C1", 0.35, [_count_above(b.all_lambdas, rtol) for b in pb])]
        width = 0.8 / len(bars)
        for i, (label, color, alpha, values) in enumerate(bars):
            ax.bar(x + (i - (len(bars) - 1) / 2) * width, values, width, color=color, alpha=alpha, label=label)
        ax.plot(x, [b.rank_G for b in ib], "k_", ms=22, mew=2, label="rank G")
        ax.axhline(ib[0].input_dim, color="0.4", ls="--", lw=1, label="width d")
        if d_model is not None:
            ax.plot(x, [architectural_ceiling(s, b.input_dim, d_model) for s, b in zip(sites, ib, strict=True)],
                    "_", color="C3", ms=26, mew=2.5, label="IB dim ceiling (architecture)")
            if d_model != ib[0].input_dim:
                ax.axhline(d_model, color="C3", ls=":", lw=1, label="d_model")
        if n_tokens is not None and token_ceiling(ib[0].input_dim, n_tokens) < ib[0].input_dim:
            ax.plot(x, [token_ceiling(b.input_dim, n_tokens) for b in ib], "_", color="0.55", ms=26, mew=2.5,
                    label="rank G ceiling (tokens)")
        ax.set_xticks(x, [_site_label(s).removeprefix("layer ") for s in sites])
        ax.set_title(f"{kind}: kept dimension per layer (table: rtol={ib[0].rtol:g})", fontsize=10)
        ax.set_xlabel("layer")
        ax.set_ylabel("dimension")
        ax.set_ylim(0, ib[0].input_dim * 1.12)
        ax.grid(True, axis="y", alpha=0.3)
    legend: dict[str, Any] = {}  # every panel's entries once (d_model shows only where d ≠ d_model)
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 3), fontsize=8)
    return fig


def _count_above(values: torch.Tensor, rtol: float) -> int:
    top = float(values.max()) if values.numel() else 0.0
    return int((values > rtol * top).sum()) if top > 0 else 0


def plot_dim_curves(bases: Mapping[str, InteractionBasis], *, eps_hat: float | None = None) -> Figure:
    """Interaction-basis dimension against the noise scale ε (``InteractionBasis.dim_curve``), per layer.

    A direction counts at scale ε when its Λ exceeds ε (the paper's finite-data picture, §2.2.2 and §6).
    ``eps_hat`` (the loss scale ε̂ of a whole-model LLC estimate) is marked when given, as a reference for
    the scale that the sampler probed.
    """
    if not bases:
        raise BadInputError("plot_dim_curves needs interaction bases")
    groups = _by_kind(list(bases))
    fig = Figure(figsize=(5.2 * len(groups), 3.8), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False)[0]
    for ax, (kind, sites) in zip(axes, groups.items(), strict=True):
        colors = _layer_colors(sites)
        for site in sites:
            eps, dims = bases[site].dim_curve(n_points=128)
            if eps.numel():
                ax.step(eps.numpy(), dims.numpy(), where="post", color=colors[site], label=_site_label(site))
        if eps_hat is not None and math.isfinite(eps_hat) and eps_hat > 0:
            ax.axvline(eps_hat, color="k", ls=":", lw=1, label=f"ε̂ of whole-model LLC ({eps_hat:.2g})")
        ax.set_xscale("log")
        ax.set_title(f"{kind}: interaction-basis dimension against ε", fontsize=10)
        ax.set_xlabel("noise scale ε (threshold on Λ)")
        ax.set_ylabel("#{Λ_i > ε}")
        ax.set_ylim(bottom=0)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_ablation_curves(curves: Mapping[str, Mapping[str, Any]], *, tolerance: float | None = None) -> Figure:
    """Loss against kept directions, one panel per site: interaction basis and PCA, measured and predicted.

    ``curves``: site -> {basis kind -> :class:`~tl_degeneracy.AblationCurve`}. Solid lines with markers are
    measured, dashed lines the quadratic prediction ½ tr(M (I − P_k) G_c (I − P_k)ᵀ) (SPEC §5c). Log scale
    on the loss (zeros, e.g. at k = dim, are not drawn); the dotted line marks ``tolerance``.
    """
    if not curves:
        raise BadInputError("plot_ablation_curves needs at least one curve")
    sites = sort_sites(list(curves))
    n_rows, n_cols = _grid(len(sites))
    fig = Figure(figsize=(4.2 * n_cols, 3.3 * n_rows), dpi=_DPI, layout="constrained")
    axes = np.atleast_2d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    colors = {"interaction": "tab:blue", "pca": "tab:orange"}
    for ax, site in zip(axes, sites, strict=False):
        label = "loss"
        # values below 1e-12 of the largest loss on the panel are rounding (e.g. the prediction at k = dim)
        top = max(float(c.loss.max()) for c in curves[site].values() if c.loss.numel())
        floor = 1e-12 * top if top > 0 else 0.0
        for kind, curve in curves[site].items():
            color = colors.get(kind, "tab:gray")
            k = np.asarray(curve.keep)
            loss = curve.loss.detach().cpu().double().numpy()
            pos = loss > floor
            ax.plot(k[pos], loss[pos], "o-", color=color, ms=3, lw=1.3, label=f"{kind} measured")
            if curve.predicted is not None:
                pred = curve.predicted.detach().cpu().double().numpy()
                ax.plot(k[pred > floor], pred[pred > floor], "--", color=color, lw=1.1, label=f"{kind} predicted")
            label = {"kl": "KL(p ‖ p_ablated)", "ce": "Δ cross-entropy", "top1": "argmax changed"}.get(
                curve.loss_kind, curve.loss_kind)
        if tolerance is not None and tolerance > 0:
            ax.axhline(tolerance, color="black", ls=":", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(site, fontsize=9)
        ax.set_xlabel("directions kept k")
        ax.set_ylabel(label)
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7, loc="upper right")
    for ax in axes[len(sites):]:
        ax.set_visible(False)
    return fig


def _grid(n: int, max_cols: int = 4) -> tuple[int, int]:
    cols = min(n, max_cols)
    return -(-n // cols), cols


def plot_head_sync(head_syncs: Mapping[int, Any], *, measure: str = "distance", tau: float | None = None) -> Figure:
    """Heat maps of the distance between every pair of heads, one per layer (paper §3.2, SPEC §4).

    ``head_syncs``: layer -> :class:`~tl_degeneracy.analysis.sync.HeadSync` (what :func:`tl_degeneracy.head_sync`
    returns), drawn with its ``measure`` matrix (``"distance"``, ``"normalized_distance"``, ...); or
    layer -> a plain [H, H] matrix. With ``tau`` each title gives the number of synchronised blocks
    (``HeadSync.blocks(tau, measure=measure)``). Cells carry their values when there are at most 8 heads.
    """
    if not head_syncs:
        raise BadInputError("plot_head_sync needs at least one layer")
    layers = sorted(head_syncs)
    matrices = {x: torch.as_tensor(getattr(head_syncs[x], measure, head_syncs[x])).double() for x in layers}
    n_rows, n_cols = _grid(len(layers))
    fig = Figure(figsize=(3.4 * n_cols + 0.8, 3.1 * n_rows), dpi=_DPI, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    finite = [float(m[torch.isfinite(m)].max()) for m in matrices.values() if bool(torch.isfinite(m).any())]
    vmax = max(finite, default=1.0) or 1.0
    image = None
    for ax, layer in zip(axes, layers, strict=False):
        d = matrices[layer].numpy()
        image = ax.imshow(d, cmap="magma_r", vmin=0.0, vmax=vmax)
        n = d.shape[0]
        if n <= 8:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{d[i, j]:.2g}", ha="center", va="center", fontsize=7,
                            color="white" if d[i, j] > 0.6 * vmax else "black")
        title = f"layer {layer}"
        if tau is not None and hasattr(head_syncs[layer], "blocks"):
            n_blocks = len(head_syncs[layer].blocks(tau, measure=measure))
            title += f": {n_blocks} block{'s' if n_blocks != 1 else ''} of {n} heads at τ={tau:g}"
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("head h'")
        ax.set_ylabel("head h")
        ticks = list(range(0, n, max(1, n // 8)))
        ax.set_xticks(ticks)
        ax.set_yticks(ticks)
    for ax in axes[len(layers):]:
        ax.set_visible(False)
    fig.colorbar(image, ax=list(axes[: len(layers)]), shrink=0.85, label=measure.replace("_", " "))
    fig.suptitle("attention-head synchronisation: distance between the heads' attention patterns", fontsize=10)
    return fig


def plot_sync_sweeps(sync: Mapping[str, Any]) -> Figure:
    """Number of synchronised blocks against τ for heads and neurons, per layer (from ``sync/summary.json``).

    The vertical line marks the τ used in the summary table.
    """
    layers = sync.get("layers", {})
    if not layers:
        raise BadInputError("plot_sync_sweeps needs synchronisation results")
    kinds = [k for k in ("heads", "neurons") if any(k in v for v in layers.values())]
    fig = Figure(figsize=(5.0 * len(kinds), 3.6), dpi=_DPI, layout="constrained")
    axes = fig.subplots(1, len(kinds), squeeze=False)[0]
    names = sorted(layers, key=int)
    import matplotlib

    cmap, norm = matplotlib.colormaps["viridis"], Normalize(vmin=0, vmax=max(int(names[-1]), 1))
    for ax, kind in zip(axes, kinds, strict=True):
        tau = sync.get(f"tau_{kind}")
        sweeps = {x: layers[x][kind]["sweep"] for x in names if layers[x].get(kind)}
        right = 1.5 * max([max(sw["taus"], default=0.0) for sw in sweeps.values()] + [tau or 0.0])
        for layer, sw in sweeps.items():
            taus, n_blocks = np.asarray(sw["taus"], float), np.asarray(sw["n_blocks"], float)
            keep = taus > 0
            # the last threshold of a sweep joins every unit; carry its count to the right edge
            x, y = np.append(taus[keep], right), np.append(n_blocks[keep], n_blocks[-1])
            ax.step(x, y, where="post", color=cmap(norm(int(layer))), label=f"layer {layer}")
        if tau:
            ax.axvline(tau, color="k", ls=":", lw=1, label=f"τ = {tau:g} (table)")
        ax.set_xscale("log")
        ax.set_title(f"{kind}: synchronised blocks against τ", fontsize=10)
        ax.set_xlabel(f"threshold τ on the {sync.get('measure', 'distance').replace('_', ' ')}")
        ax.set_ylabel("number of blocks")
        ax.set_ylim(bottom=0)
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=7)
    return fig


def plot_llc_traces(results: Mapping[str, Any]) -> Figure:
    """SGLD traces nβ·(L(w_t) − L(w*)) of every chain, one panel per parameter selection.

    The running value is what λ̂ averages after burn-in (grey band): a trace that rises and then stays flat
    is healthy; one still climbing at the end needs more steps, one that spikes needs a smaller step size.
    """
    if not results:
        raise BadInputError("plot_llc_traces needs at least one LLC result")
    names = list(results)
    n_rows, n_cols = _grid(len(names), 3)
    fig = Figure(figsize=(4.4 * n_cols, 3.0 * n_rows), dpi=_DPI, layout="constrained")
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    for ax, name in zip(axes, names, strict=False):
        res = results[name]
        trace = res.nbeta * (res.loss_trace.double().numpy() - res.loss_at_optimum)
        steps = np.arange(trace.shape[1])
        for c in range(trace.shape[0]):
            ax.plot(steps, trace[c], lw=0.8, alpha=0.8, label=f"chain {c}")
        ax.axvspan(0, res.n_burnin, color="0.85", zorder=0, label="burn-in")
        ax.axhline(res.llc_mean, color="k", ls="--", lw=1, label="λ̂")
        verdict = res.verdict if len(res.verdict) < 60 else res.verdict[:57] + "…"
        ax.set_title(f"{name}: λ̂ = {res.llc_mean:.3g} ± {res.llc_se:.2g} (s.e.), ε̂ = {res.eps_hat:.2g}\n{verdict}",
                     fontsize=8, color="k" if res.converged else "C3")
        ax.set_xlabel("SGLD step")
        ax.set_ylabel("nβ·(L − L(w*))")
        ax.grid(True, alpha=0.3)
    for ax in axes[len(names):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6, loc="lower right")
    return fig


def plot_llc_scale(results: Any) -> Figure:
    """The nβ sweep (an ``LLCScaleSweep``): λ̂ against the inverse temperature nβ the sampler was given (left),
    and the effective parameter count N_eff(ε) = 2λ_B(ε) (paper §2.2.2, eq. 9) against the loss scale ε̂ each
    estimate probed (right).

    Each point is one nβ; its loss scale is ε̂ = λ̂/nβ, so larger nβ probes smaller ε. Error bars are standard
    errors (``LLCResult.llc_se``): s.e.(λ̂) on the left; on the right 2·s.e.(λ̂) vertically and s.e.(λ̂)/nβ
    horizontally (ε̂ is estimated too). The right panel is log–log, with the number of sampled parameters N
    (dashed: the value N_eff would take if no direction were degenerate at that scale) and, on its right-hand
    axis, the fraction N_eff/N. Estimates whose verdict is not ``converged`` are drawn hollow.
    """
    results = list(getattr(results, "results", results))  # an LLCScaleSweep or a sequence of LLCResult
    if not results:
        raise BadInputError("plot_llc_scale needs LLC results at one or more nβ")
    res = sorted(results, key=lambda r: r.nbeta)
    nbeta = np.array([r.nbeta for r in res])
    eps = np.array([r.eps_hat for r in res])
    lam = np.array([r.llc_mean for r in res])
    se = np.nan_to_num(np.array([r.llc_se for r in res]))
    ok = np.array([r.converged for r in res])
    fig = Figure(figsize=(10, 3.8), dpi=_DPI, layout="constrained")
    ax_l, ax_n = fig.subplots(1, 2)

    def points(ax: Any, x: np.ndarray, y: np.ndarray, *, yerr: np.ndarray, xerr: np.ndarray | None,
               color: str, label: str) -> None:
        ax.errorbar(x, y, yerr=yerr, xerr=xerr, color=color, capsize=3, lw=1, ls="-", marker="none")
        ax.plot(x[ok], y[ok], "o", color=color, label=label)
        if not ok.all():
            ax.plot(x[~ok], y[~ok], "o", mfc="white", color=color, label="not converged (see the verdicts)")

    points(ax_l, nbeta, lam, yerr=se, xerr=None, color="C0", label="λ̂ ± s.e.")
    for r, x, y in zip(res, nbeta, lam, strict=True):
        ax_l.annotate(f"ε̂={r.eps_hat:.2g}", (x, y), textcoords="offset points", xytext=(-10, 6), fontsize=7)
    ax_l.set_title("behavioral LLC against the inverse temperature", fontsize=10)
    ax_l.set_xlabel("nβ")
    ax_l.set_ylabel("λ̂_B")
    ax_l.legend(fontsize=7)

    n_eff = 2 * lam
    points(ax_n, eps, n_eff, yerr=2 * se, xerr=se / nbeta, color="C2", label="N_eff = 2λ̂ ± 2 s.e.")
    n_params = res[0].diagnostics.get("n_sampled_entries")
    log_y = bool(np.all(n_eff > 0))
    if log_y:
        ax_n.set_yscale("log")  # before the secondary axis, which takes the scale it finds
    y_axes = [ax_n.yaxis]
    if n_params:
        ax_n.axhline(n_params, color="0.4", ls="--", lw=1, label=f"sampled parameters N = {n_params:,}")
        frac = ax_n.secondary_yaxis("right", functions=(lambda v: v / n_params, lambda f: f * n_params))
        frac.set_ylabel("N_eff / N")
        y_axes.append(frac.yaxis)
    if log_y:  # a narrow range (a sweep without the N line) is ticked at 1, 2, 5 × 10^k, a wide one at 10^k
        values = np.concatenate([n_eff, [n_params] if n_params else []])
        subs = (1.0,) if np.log10(values.max() / values.min()) > 2 else (1.0, 2.0, 5.0)
        for axis in y_axes:
            axis.set_major_locator(LogLocator(subs=subs))
            axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.3g}"))
            axis.set_minor_formatter(NullFormatter())
    ax_n.set_title("effective parameter count N_eff(ε) (eq. 9)", fontsize=10)
    ax_n.set_xlabel("loss scale ε̂ = λ̂/nβ")
    ax_n.set_ylabel("N_eff(ε̂)")
    ax_n.legend(fontsize=7)
    for ax, x in ((ax_l, nbeta), (ax_n, eps)):
        if np.all(x > 0):  # log axis, ticked at the points themselves (a sweep spans a decade or two)
            ax.set_xscale("log")
            ax.set_xticks(x, [f"{v:,.0f}" if v >= 100 else f"{v:.2g}" for v in x])
            ax.xaxis.set_minor_formatter(NullFormatter())
        ax.grid(True, which="major", alpha=0.3)
    return fig


# ---------------------------------------------------------------------------------------------------------
# the whole report
# ---------------------------------------------------------------------------------------------------------
def _save(fig: Figure, path: Path) -> Path:
    return atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=_DPI, format="png"))


def write_report(folder: str | os.PathLike) -> Path:
    """Redraw ``summary.csv``, ``summary.md``, ``plots/*.png`` and ``index.md`` from the saved results.

    Needs no model: only the files the stages wrote. Parts whose stage has not run are left out and named in
    ``index.md``. Returns the path of ``index.md``.
    """
    res = load_results(folder)
    if res.empty:
        raise BadInputError(
            f"'{res.folder}' holds no tl-degeneracy results; run `tl-degeneracy run --out {res.folder}` first"
        )
    run = RunFolder(res.folder)
    root = run.root
    for rel in run.manifest().get("report", []):  # only the plots a report wrote; never a user's files
        if rel.startswith("plots/"):
            (root / rel).unlink(missing_ok=True)
    foreign = {p: p.stat().st_mtime_ns for p in run.plots.glob("*.png")}  # a user's (or older) pictures
    rows = summary_rows(res)
    write_summary(rows, root)
    whole = res.llc.get("all")
    eps_hat = whole.eps_hat if whole is not None else None

    sections: list[str] = []
    if res.bases:
        _save(plot_spectra(res.bases, res.pca or None), run.plot("spectra"))
        model_meta = (res.stats_meta or {}).get("model", {})
        _save(plot_dims(res.bases, res.pca or None, d_model=model_meta.get("d_model"),
                        n_tokens=(res.stats_meta or {}).get("n_tokens")), run.plot("dims"))
        _save(plot_dim_curves(res.bases, eps_hat=eps_hat), run.plot("dim_vs_eps"))
        ib = next(iter(res.bases.values()))
        sections.append(
            "## Interaction basis (paper §6)\n\n"
            "![Λ spectra](plots/spectra.png)\n\n"
            "Top: the eigenvalues Λ of G·M at each site (G the activation covariance, M the Gram matrix of "
            "the output Jacobian under the "
            f"{_jacobian_metric(res)} metric). Λ_i is the variance of interaction-basis coordinate i, "
            "measured in units of the output change it causes, so it does not depend on how the layer is "
            "parameterised (§6.2). Bottom: the PCA variances (eigenvalues of G) of the same sites, which do. "
            "A spectrum that falls by many decades means few directions matter to the output.\n\n"
            "![dimension per layer](plots/dims.png)\n\n"
            f"Kept dimension per layer. Solid bars use the tolerance of the table (rtol = {ib.rtol:g} of the "
            "largest eigenvalue, above the float64 noise floor); light bars count eigenvalues above 10⁻³ of "
            "the largest; black ticks mark the rank of G. Where the interaction basis keeps fewer directions "
            "than PCA, the activations vary along directions the output ignores. Red ticks mark the "
            "architectural ceiling of the interaction-basis dimension: the rank of M is at most the width of the "
            "narrowest layer after the site (d_model for the MLP output, which enters the residual stream "
            "through W_out); grey ticks, where shown, the rank of G that the number of tokens allows (N − 1). "
            "A dimension at a ceiling (▲ in the table) is set by the architecture or the data size, not by the "
            "model's degeneracy. The dotted lines in the spectra are each site's float64 noise floor.\n\n"
            "![dimension against epsilon](plots/dim_vs_eps.png)\n\n"
            "Interaction-basis dimension against the noise scale ε: the number of directions whose Λ exceeds "
            "ε. In the paper's finite-data picture (§2.2.2) a direction below ε is degenerate at that scale, "
            "so this curve is the layer's dimension as a function of how much behaviour one is willing to "
            "ignore." + (" The dotted line is ε̂ of the whole-model LLC estimate." if eps_hat else "") + "\n"
        )
    if res.ablation:
        tol = res.ablation_tolerance
        _save(plot_ablation_curves(res.ablation, tolerance=tol), run.plot("ablation"))
        n_tok = next(iter(next(iter(res.ablation.values())).values())).n_tokens
        sections.append(
            "## Ablation curves (does the basis hold what the model uses?)\n\n"
            "![ablation curves](plots/ablation.png)\n\n"
            "At each site the activations are rotated into a basis, only the top k directions are kept and "
            "everything else is replaced by its mean; the curve is the mean KL divergence of the ablated model's "
            f"predictions from the original's over {n_tok} output positions. Solid: measured; dashed: the "
            "quadratic prediction ½ tr(M (I − P_k) G_c (I − P_k)ᵀ), which neglects cross-position terms and "
            "curvature beyond second order. A basis that holds what the model uses reaches a small loss with "
            "few directions; the interaction basis should need no more than PCA. "
            + (f"The table's 'directions needed' is the smallest measured k whose KL stays within "
               f"{tol:g} nats (on the curve's schedule of k)." if tol is not None else "") + "\n"
        )
    if res.sync:
        if res.head_sync:
            _save(plot_head_sync(res.head_sync, measure=res.sync.get("measure", "distance"),
                                 tau=res.sync.get("tau_heads")), run.plot("head_sync"))
        _save(plot_sync_sweeps(res.sync), run.plot("sync_sweep"))
        sections.append(
            "## Synchronisation (paper §3.2)\n\n"
            + ("![head synchronisation](plots/head_sync.png)\n\n" if res.head_sync else "")
            + f"Heat maps of the {res.sync.get('measure', 'distance').replace('_', ' ')} between the attention "
            "patterns of every pair of heads in a layer (mean over counted query tokens of ‖A_h[q] − A_h'[q]‖²"
            + (", divided by the heads' mean squared pattern norms" if "normalized" in res.sync.get("measure", "")
               else "")
            + "). Heads at distance ≈ 0 attend alike; a block of such heads frees r_S² − Σ r_h² extra "
            "parameters (value vectors can be mixed across the block).\n\n"
            "![synchronisation sweep](plots/sync_sweep.png)\n\n"
            "Number of synchronised blocks (single linkage on distance ≤ τ) against τ, for heads and MLP "
            f"neurons. The table uses τ = {res.sync.get('tau_heads'):g} for heads and "
            f"τ = {res.sync.get('tau_neurons'):g} for neurons; fewer blocks than units means fewer distinct "
            "nonlinear operations, hence more degeneracy.\n"
        )
    if res.llc:
        _save(plot_llc_traces(res.llc), run.plot("llc_traces"))
        sections.append(
            "## Behavioral local learning coefficient (paper §2)\n\n"
            "![LLC traces](plots/llc_traces.png)\n\n"
            "SGLD traces of nβ·(L_B(w_t) − L_B(w*)) for the whole model (`all`) and for each layer's "
            "parameters (`blocks.l`), where L_B is the KL divergence from the original model's predictions. "
            "λ̂ is the post-burn-in mean; traces should rise and level off. A smaller λ̂ means a more "
            "degenerate (simpler) solution at the loss scale ε̂ = λ̂/nβ. "
            + _llc_settings_sentence(res.llc) + "\n\n" + _llc_estimates_table(res.llc) + "\n"
        )
    if res.graph is not None:
        settings = (res.stages.get("graph") or {}).get("settings", {})
        eps = settings.get("eps")
        modules = find_modules(res.graph, eps=eps, seed=settings.get("seed", 0)) if eps else None
        _save(plot_interaction_graph(res.graph, modules), run.plot("interaction_graph"))
        sections.append(
            "## Interaction graph (paper §4–5)\n\n"
            "![interaction graph](plots/interaction_graph.png)\n\n"
            "Local-interaction-basis directions of the residual stream (columns: sites; node area ∝ Λ) and the "
            "squared edges between consecutive sites (width and opacity: log-normalised strength; edges more "
            "than three decades below the strongest are not drawn). "
            + (f"Colours: {modules.n_modules} modules found at ε = {eps:g}, §5 cut cost {modules.cost:.3g} "
               "(Σ over cut edges of ½·log(E/ε))." if modules else
               "Modules are found with `--graph-eps EPS` (the §5 noise scale).") + "\n"
            + _edges_needed_paragraph(res.edges_needed)
        )
    if res.llc_scale:
        _save(plot_llc_scale(res.llc_scale), run.plot("llc_scale"))
        sections.append(
            "![lambda and N_eff against epsilon](plots/llc_scale.png)\n\n"
            "The whole-model estimate at several inverse temperatures nβ. Left: λ̂ ± s.e. against nβ, each point "
            "labelled with the loss scale ε̂ = λ̂/nβ it probes. Right: the effective parameter count "
            "N_eff(ε) = 2λ_B(ε) (eq. 9) against ε̂, log–log, beside the number of sampled parameters N "
            "(right-hand axis: N_eff/N). N_eff far below N says most parameter directions do not change the "
            "behaviour at that scale; N_eff grows as ε shrinks and finer behaviour counts. Hollow points are "
            "estimates whose verdict is not `converged`.\n"
        )

    missing = [name for name, have in (("interaction basis", res.bases), ("ablation curves", res.ablation),
                                       ("synchronisation", res.sync),
                                       ("LLC", res.llc)) if not have]
    header = _header(res)
    body = "\n".join(sections)
    note = (f"\nNot in this folder (stage not run or not available): {', '.join(missing)}.\n" if missing else "")
    sync_note = ""
    if res.sync:
        sync_note = (f" Head and neuron blocks are counted at τ = {res.sync.get('tau_heads'):g} and "
                     f"τ = {res.sync.get('tau_neurons'):g} on the {res.sync.get('measure', '').replace('_', ' ')}; "
                     "extra dof is the freedom synchronisation adds (Σ_S r_S² − Σ_u r_u²).")
    if whole is not None:
        header += (f"\n**Whole-model behavioral LLC** at nβ = {whole.nbeta:g}: λ̂ = {whole.llc_mean:.4g} ± "
                   f"{whole.llc_se:.2g} (s.e.), ε̂ = {whole.eps_hat:.3g}, N_eff = {whole.n_eff:.4g}; {whole.verdict}.\n")
    index = (f"# tl-degeneracy report\n\n{header}\n## Summary per layer\n\n"
             "One row per site: width d, rank of the activation covariance G, kept dimension of the interaction "
             "basis (IB) and of PCA at the same relative tolerance, and the largest Λ. Two ceilings are set by the "
             "set-up rather than the model: the rank of G is at most N − 1 for N counted tokens, and the IB "
             "dimension at most the width of the narrowest layer after the site (d_model for the MLP output); "
             "a value at its ceiling is marked ▲. The synchronisation and "
             "LLC columns belong to the site's layer and repeat; the LLC is that of the layer's parameters "
             f"(`blocks.l`) with its loss scale ε̂.{sync_note} Also in [summary.csv](summary.csv).\n\n"
             f"{summary_markdown(rows)}\n{body}{note}")
    path = atomic_write(run.index, lambda tmp: Path(tmp).write_text(index))
    if run.manifest_path.is_file():
        plots = sorted(p for p in run.plots.glob("*.png") if foreign.get(p) != p.stat().st_mtime_ns)
        run.record("report", [run.relative(p) for p in (run.summary_csv, run.summary_md, run.index, *plots)])
    return path


def _llc_estimates_table(results: Mapping[str, Any]) -> str:
    """Every estimate with its standard error and verdict (the whole model first)."""
    lines = ["| parameters | λ̂ ± s.e. | ESS | MALA acceptance | R̂ | verdict |", "|---|---|---|---|---|---|"]
    for name in sorted(results, key=lambda n: (n != "all", n)):
        r = results[name]
        d = r.diagnostics
        acc = [a for a in d.get("mala_acceptance", []) if isinstance(a, float) and math.isfinite(a)]
        lines.append(f"| `{name}` | {r.llc_mean:.4g} ± {r.llc_se:.2g} | {_fmt(d.get('ess_bulk'))} | "
                     f"{_fmt(sum(acc) / len(acc) if acc else None)} | {_fmt(d.get('r_hat_rank'))} | {r.verdict} |")
    return ("λ̂ ± its standard error: the Monte-Carlo standard error of the post-burn-in mean over all chains, "
            "from their spread and effective sample size (ESS). The verdict requires mean MALA acceptance ≥ 0.9, "
            "rank-normalised R̂ ≤ 1.1, bulk ESS ≥ 50, a trace whose last two quarters agree, and no divergence.\n\n"
            + "\n".join(lines) + "\n")


def llc_warnings(folder: str | os.PathLike) -> list[str]:
    """One line per LLC estimate of a run folder that is not converged (for the command's closing summary)."""
    res = load_results(folder)
    return [f"LLC '{name}': λ̂ = {r.llc_mean:.4g} ± {r.llc_se:.2g}, {r.verdict}" for name, r in res.llc.items()
            if not r.converged]


def _llc_settings_sentence(results: Mapping[str, Any]) -> str:
    """What the sampler ran with, and how healthy it looked (MALA acceptance), in one sentence."""
    first = next(iter(results.values()))
    st = first.settings
    accept = [a for r in results.values() for a in r.diagnostics.get("mala_acceptance", [])
              if isinstance(a, float) and math.isfinite(a)]
    text = (f"Settings: nβ = {first.nbeta:g}, step size {st.get('step_size', float('nan')):g}, localization "
            f"γ = {st.get('localization', float('nan')):g}, {st.get('n_chains')} chains × {st.get('n_steps')} "
            f"steps ({first.n_burnin} burn-in).")
    if accept:
        text += (f" MALA acceptance {min(accept):.2f}–{max(accept):.2f} (≈0.9 or above is healthy; lower "
                 "means the step size is too large for an accurate λ̂).")
    return text + (" The verdict column says which estimates can be reported; for a model other than the bundled "
                   "one (whose defaults were calibrated), choose the settings with `tl-degeneracy calibrate`.")


def _jacobian_metric(res: RunResults) -> str:
    metric = ((res.stats_meta or {}).get("jacobian") or {}).get("metric")
    return {"kl": "KL (softmax Fisher)", "mse": "squared-error (identity)"}.get(metric, str(metric))


def _header(res: RunResults) -> str:
    meta = res.stats_meta or {}
    model = meta.get("model", {})
    data = meta.get("data", {})
    stats_settings = res.stages.get("stats", {}).get("settings", {})
    lines = []
    if stats_settings.get("model"):
        lines.append(f"- model: `{stats_settings['model']}`")
    if model:
        lines.append(f"- architecture: {model.get('n_layers')} layers, d_model {model.get('d_model')}, "
                     f"d_mlp {model.get('d_mlp')}, {model.get('n_heads')} heads "
                     f"(TransformerLens {model.get('transformer_lens_version')})")
    if meta:
        jac = meta.get("jacobian") or {}
        source = stats_settings.get("data") or data.get("path") or data.get("source")
        lines.append(f"- statistics: {meta.get('n_tokens')} counted tokens"
                     + (f" from `{source}`" if source else "")
                     + (f"; Jacobian metric {jac.get('metric')}, {jac.get('n_probes')} probes per token"
                        if jac.get("metric") else ""))
    if (res.run or {}).get("command"):
        lines.append(f"- last command: `{res.run['command']}` (see [run.json](run.json))")
    if res.stages:
        order = ("stats", "basis", "sync", "llc")
        names = sorted(res.stages, key=lambda n: order.index(n) if n in order else len(order))
        timing = ", ".join(f"{n} {res.stages[n].get('seconds', 0):.1f} s" for n in names)
        lines.append(f"- stage times: {timing}")
    return "\n".join(lines) + "\n" if lines else ""
