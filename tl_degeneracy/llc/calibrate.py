"""Choosing the SGLD step size and localization for an LLC estimate (issue 16; SPEC §5).

:func:`calibrate_llc` runs short chains over a grid of step sizes ε and localizations γ and records each cell's
λ̂ ± s.e., MALA acceptance, R̂ and verdict. The recommended setting is the **largest step in the region where
λ̂ is flat in ε and the verdict holds**, at the **smallest γ** that has such a region:

- flat: at one γ, a converged cell whose λ̂ agrees with the λ̂ of the smallest converged step there (the least
  step-size bias: λ̂ grows like 1/(1 − εa/4) on curvature a) within 3 combined standard errors or 5%, and precisely
  enough to tell: 3 combined standard errors at most 25% of that λ̂ (a cell whose own error bar is wide, e.g. from
  one chain's excursion into a loss wall, "agrees" with anything and is no evidence of flatness);
- at least two flat cells (the plateau must be seen, not assumed);
- the smallest such γ: the localization biases λ̂ downwards (it adds γ to every curvature), so the weakest one
  that still converges disturbs it least.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tl_degeneracy._io import read_json, write_json
from tl_degeneracy.errors import BadInputError, SamplerDivergedError
from tl_degeneracy.llc.behavioral import LossKind, _session
from tl_degeneracy.llc.sgld import LLCResult

__all__ = ["LLCCalibration", "calibrate_llc"]

#: flat: |λ̂ − λ̂_ref| within this many combined standard errors ...
FLAT_SE = 3.0
#: ... or within this fraction of λ̂_ref
FLAT_RTOL = 0.05
#: ... and the comparison must resolve a departure of this fraction of λ̂_ref: FLAT_SE combined s.e. at most this
FLAT_RESOLVE = 0.25


@dataclass
class LLCCalibration:
    """The outcome of :func:`calibrate_llc`: one cell per (localization γ, step size ε).

    Attributes:
        step_sizes, localizations: the grid (ascending).
        nbeta: nβ of every cell.
        llc, llc_se, acceptance, r_hat: [γ, ε] tensors of λ̂, its standard error, the mean MALA acceptance and
            the rank-normalised R̂.
        verdicts: ``[γ][ε]`` verdict strings (``"converged"`` or ``"not converged: ..."``).
        flat: [γ, ε] bool: converged and in the flat region (see the module docstring).
        recommended: ``{"step_size", "localization", "llc", "llc_se"}``, or None when no γ has two flat cells.
        reason: one line saying why that recommendation, or why none.
    """

    step_sizes: list[float]
    localizations: list[float]
    nbeta: float
    llc: Tensor
    llc_se: Tensor
    acceptance: Tensor
    r_hat: Tensor
    verdicts: list[list[str]]
    flat: Tensor
    recommended: dict[str, float] | None
    reason: str
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def converged(self) -> Tensor:
        """[γ, ε] bool: the verdict of each cell."""
        return torch.tensor([[v == "converged" for v in row] for row in self.verdicts], dtype=torch.bool)

    def rows(self) -> list[dict[str, Any]]:
        """One dict per cell."""
        return [
            {"localization": g, "step_size": e, "llc": float(self.llc[i, j]), "llc_se": float(self.llc_se[i, j]),
             "acceptance": float(self.acceptance[i, j]), "r_hat": float(self.r_hat[i, j]),
             "flat": bool(self.flat[i, j]), "verdict": self.verdicts[i][j]}
            for i, g in enumerate(self.localizations) for j, e in enumerate(self.step_sizes)
        ]

    def __str__(self) -> str:
        head = f"LLC calibration at nβ = {self.nbeta:g}: "
        if self.recommended is None:
            return head + f"no recommendation ({self.reason})"
        r = self.recommended
        return head + (f"step_size = {r['step_size']:.3g}, localization = {r['localization']:.3g} "
                       f"(λ̂ = {r['llc']:.4g} ± {r['llc_se']:.2g}); {self.reason}")

    def save(self, path: str | Path) -> Path:
        """``calibration.json`` in the folder ``path`` (atomic, through the one writer)."""
        folder = Path(path)
        write_json(folder / "calibration.json", {
            "format": "tl_degeneracy.LLCCalibration/1", "step_sizes": self.step_sizes,
            "localizations": self.localizations, "nbeta": self.nbeta, "rows": self.rows(),
            "recommended": self.recommended, "reason": self.reason, "settings": self.settings,
        }, indent=2, nan_to_null=False)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> LLCCalibration:
        file = Path(path) / "calibration.json"
        if not file.is_file():
            raise BadInputError(f"{Path(path)} holds no saved LLCCalibration (calibration.json)")
        meta = read_json(file)
        steps, gammas = meta["step_sizes"], meta["localizations"]
        rows = iter(meta["rows"])
        grid = [[next(rows) for _ in steps] for _ in gammas]

        def t(key: str, dtype: torch.dtype = torch.float64) -> Tensor:
            return torch.tensor([[c[key] for c in row] for row in grid], dtype=dtype)

        return cls(steps, gammas, float(meta["nbeta"]), t("llc"), t("llc_se"), t("acceptance"), t("r_hat"),
                   [[c["verdict"] for c in row] for row in grid], t("flat", torch.bool), meta["recommended"],
                   meta["reason"], meta.get("settings", {}))

    def plot(self, path: str | Path | None = None) -> Any:
        """Heat-map of λ̂ over (ε, γ): each cell annotated with λ̂ and its acceptance, converged cells outlined,
        flat cells dotted, the recommendation starred. Saved to ``path`` when given; returns the figure."""
        import matplotlib

        if path is not None:
            matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(1.3 * len(self.step_sizes) + 2.5, 0.9 * len(self.localizations) + 1.8))
        im = ax.imshow(self.llc.numpy(), aspect="auto", cmap="viridis", origin="lower")
        fig.colorbar(im, ax=ax, label="λ̂")
        ax.set_xticks(range(len(self.step_sizes)), [f"{e:.2g}" for e in self.step_sizes])
        ax.set_yticks(range(len(self.localizations)), [f"{g:.3g}" for g in self.localizations])
        ax.set_xlabel("step size ε")
        ax.set_ylabel("localization γ")
        conv = self.converged
        for i in range(len(self.localizations)):
            for j in range(len(self.step_sizes)):
                ax.text(j, i, f"{float(self.llc[i, j]):.3g}\nacc {float(self.acceptance[i, j]):.2f}", ha="center",
                        va="center", fontsize=7, color="white")
                if conv[i, j]:
                    ax.add_patch(matplotlib.patches.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2,
                                                              ec="white", ls="-" if self.flat[i, j] else ":"))
        if self.recommended is not None:
            i = self.localizations.index(self.recommended["localization"])
            j = self.step_sizes.index(self.recommended["step_size"])
            ax.plot([j], [i + 0.3], marker="*", ms=14, color="red")
        ax.set_title(f"LLC calibration, nβ = {self.nbeta:g} (outlined: converged; solid: flat; ★ recommended)",
                     fontsize=9)
        fig.tight_layout()
        if path is not None:
            fig.savefig(path, dpi=120)
            plt.close(fig)
        return fig


def _grid(values: Iterable[float], what: str, *, zero_ok: bool) -> list[float]:
    vals = [float(v) for v in values]
    if not vals or any(not math.isfinite(v) or v < 0 or (v == 0 and not zero_ok) for v in vals):
        raise BadInputError(f"{what} must be a non-empty list of {'non-negative' if zero_ok else 'positive'} "
                            f"numbers, got {vals}")
    return sorted(set(vals))


def _cell(run: Callable[[float, float], LLCResult], e: float, g: float) -> LLCResult | None:
    """One cell; None when every chain diverged (a dropped chain is recorded in the verdict)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="dropped", category=RuntimeWarning)
        try:
            return run(e, g)
        except SamplerDivergedError as err:
            return err.result


def calibrate(run: Callable[[float, float], LLCResult], *, step_sizes: Sequence[float],
              localizations: Sequence[float], nbeta: float) -> LLCCalibration:
    """The calibration grid for any sampler call: ``run(step_size, localization) -> LLCResult`` per cell
    (what :func:`calibrate_llc` does for a model; tests pass :func:`~tl_degeneracy.sgld_llc` on an analytic loss)."""
    steps = _grid(step_sizes, "step_sizes", zero_ok=False)
    gammas = _grid(localizations, "localizations", zero_ok=True)
    cells = [[_cell(run, e, g) for e in steps] for g in gammas]

    def t(f: Callable[[LLCResult], float]) -> Tensor:
        return torch.tensor([[f(r) if r is not None else float("nan") for r in row] for row in cells],
                            dtype=torch.float64)

    llc, se = t(lambda r: r.llc_mean), t(lambda r: r.llc_se)
    acceptance = t(lambda r: sum(a for a in r.diagnostics["mala_acceptance"] if a == a)
                   / max(1, sum(1 for a in r.diagnostics["mala_acceptance"] if a == a)))
    r_hat = t(lambda r: r.diagnostics.get("r_hat_rank", float("nan")))
    verdicts = [[r.verdict if r is not None else "not converged: every chain diverged" for r in row]
                for row in cells]
    flat = torch.zeros(len(gammas), len(steps), dtype=torch.bool)
    recommended, reason = None, ("no localization has two converged step sizes that agree (within 3 s.e. or 5%, with "
                                 "3 s.e. ≤ 25% of λ̂): widen the grid or run longer chains")
    for i, g in enumerate(gammas):
        ok = [j for j in range(len(steps)) if verdicts[i][j] == "converged"]
        if not ok:
            continue
        ref = ok[0]
        for j in ok:
            band = FLAT_SE * math.hypot(float(se[i, j]), float(se[i, ref]))
            level = abs(float(llc[i, ref]))
            tol = max(band, FLAT_RTOL * level)
            flat[i, j] = j == ref or (band <= FLAT_RESOLVE * level and abs(float(llc[i, j] - llc[i, ref])) <= tol)
        if recommended is None and int(flat[i].sum()) >= 2:
            j = int(torch.nonzero(flat[i]).max())
            recommended = {"step_size": steps[j], "localization": g, "llc": float(llc[i, j]),
                           "llc_se": float(se[i, j])}
            reason = (f"the largest of {int(flat[i].sum())} converged step sizes whose λ̂ agree at the smallest "
                      f"localization that has them (γ = {g:.3g})")
    return LLCCalibration(steps, gammas, float(nbeta), llc, se, acceptance, r_hat, verdicts, flat, recommended,
                          reason)


def calibrate_llc(
    model: Any,
    data: Iterable[Any],
    *,
    step_sizes: Sequence[float],
    localizations: Sequence[float],
    nbeta: float,
    n_steps: int = 200,
    n_burnin: int = 50,
    n_chains: int = 4,
    params: str | Sequence[str] = "all",
    loss: LossKind = "kl",
    seed: int = 0,
    progress: bool = True,
) -> LLCCalibration:
    """Short SGLD chains of :func:`~tl_degeneracy.estimate_llc` over a grid of step sizes and localizations,
    and the recommended setting: the largest step where λ̂ is flat and the verdict holds (paper §2.2, eq. 8;
    the rule is in :mod:`tl_degeneracy.llc.calibrate`).

    Cost: ``len(step_sizes) · len(localizations)`` estimates of ``n_steps`` steps (plus the MALA checks); the
    model's masks, functional form and θ* outputs are built once.

    Example::

        cal = tld.calibrate_llc(model, data, step_sizes=[1e-6, 3e-6, 1e-5, 3e-5], localizations=[100, 1000],
                                nbeta=1e4, n_steps=200, n_burnin=50)
        print(cal)                 # step_size = ..., localization = ... (λ̂ = ... ± ...)
        cal.plot("calibration.png")
    """
    if not isinstance(params, str) and not isinstance(params, Sequence):
        raise BadInputError("params must be a selection string or a list of them")
    steps = _grid(step_sizes, "step_sizes", zero_ok=False)
    gammas = _grid(localizations, "localizations", zero_ok=True)
    with _session(model, data, loss, "auto") as run:
        result = calibrate(
            lambda e, g: run(params, nbeta=nbeta, step_size=e, localization=g, n_steps=n_steps, n_burnin=n_burnin,
                             n_chains=n_chains, seed=seed, on_divergence="drop", progress=progress),
            step_sizes=steps, localizations=gammas, nbeta=nbeta,
        )
    result.settings = {"n_steps": n_steps, "n_burnin": n_burnin, "n_chains": n_chains, "params": params,
                       "loss": loss, "seed": seed}
    return result
