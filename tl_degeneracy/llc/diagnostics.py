"""Convergence diagnostics of SGLD traces and the verdict on an LLC estimate (SPEC §5).

Pure functions of post-burn-in traces ``[chains, draws]`` (numpy float64 inside):

- :func:`rank_r_hat`: rank-normalised split R̂ (Vehtari, Gelman, Simpson, Carpenter & Bürkner 2021, the
  definition of arviz-stats ``rhat(method="rank")``): the larger of the bulk R̂ (split chains, ranks of all
  draws mapped to normal scores) and the tail R̂ (the same on |x − median|).
- :func:`ess_bulk` and :func:`ess_mean`: effective sample sizes (arviz-stats ``ess(method="bulk")`` and
  ``"mean"``): split chains, autocorrelations by FFT, Geyer's initial monotone sequence.
- :func:`mcse_mean`: Monte-Carlo standard error of the mean, sd / sqrt(ESS_mean) (arviz-stats ``mcse``).
- :func:`llc_standard_error`: the standard error reported for λ̂: the larger of :func:`mcse_mean` of the draws and
  of their means over ``n_blocks`` consecutive blocks per chain (a slow mode under step-to-step noise).
- :func:`plateau_test`: is the trace still rising or falling? The means of the last two quarters compared
  with their Monte-Carlo standard errors.
- :func:`verdict`: ``(converged, reasons)`` from the acceptance, R̂, ESS, plateau test and divergences.

The thresholds (module constants) are stated with their reasons below; a result records the values it was
judged against.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

__all__ = ["ess_bulk", "ess_mean", "llc_standard_error", "mcse_mean", "plateau_test", "rank_r_hat", "verdict"]

#: mean MALA acceptance (over chains) below this says the step is too large for the curvature. On a Gaussian
#: target (tests/test_llc_diagnostics.py) acceptance 0.9 already goes with a step-size bias of λ̂ of ≈ 40% in 3
#: dimensions (εa ≈ 1.2, bias 1/(1 − εa/4)); in more dimensions the acceptance falls faster than the bias grows
MIN_ACCEPTANCE = 0.9
#: any single chain below this is stuck or unstable, whatever the mean
MIN_CHAIN_ACCEPTANCE = 0.5
#: rank-normalised R̂ above this: the chains disagree (Gelman's classic bound; Vehtari et al. advise 1.01 for
#: final inference, which short LLC chains rarely reach: the verdict names the value either way)
MAX_R_HAT = 1.1
#: bulk ESS below this: too few effective draws for R̂ and the standard error to mean anything
MIN_ESS = 50.0
#: the plateau test fails when the last two quarters' means differ by more than this many standard errors
PLATEAU_Z = 3.0
#: ... and by more than this fraction of the mean (a significant but negligible drift of a long chain passes)
PLATEAU_RTOL = 0.02


def _as_2d(x: Any) -> np.ndarray:
    a = x.detach().double().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    return np.atleast_2d(a)


def _split(x: np.ndarray) -> np.ndarray:
    """Each chain cut into its first and last halves (the middle draw of an odd length dropped)."""
    half = x.shape[1] // 2
    return np.concatenate([x[:, :half], x[:, x.shape[1] - half :]], axis=0)


def _normal_scores(x: np.ndarray) -> np.ndarray:
    """Ranks of all draws (ties averaged) mapped to Φ⁻¹((r − 3/8)/(S + 1/4)), S the number of draws."""
    flat = x.reshape(-1)
    order = np.argsort(flat, kind="mergesort")
    ranks = np.empty(flat.size, dtype=np.float64)
    ranks[order] = np.arange(1, flat.size + 1)
    _, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
    if np.any(counts > 1):  # average rank within ties
        sums = np.bincount(inverse, weights=ranks)
        ranks = (sums / counts)[inverse]
    p = (ranks - 0.375) / (flat.size + 0.25)
    return torch.special.ndtri(torch.from_numpy(p)).numpy().reshape(x.shape)


def _classic_r_hat(x: np.ndarray) -> float:
    n = x.shape[1]
    within = x.var(axis=1, ddof=1).mean()
    between_over_n = x.mean(axis=1).var(ddof=1)
    return float(np.sqrt(((n - 1) / n * within + between_over_n) / within))


def rank_r_hat(traces: Any) -> float:
    """Rank-normalised split R̂ of ``traces`` [chains, draws]: max(bulk R̂, tail R̂) (Vehtari et al. 2021).

    Example:
        >>> import torch
        >>> x = torch.randn(4, 200, generator=torch.Generator().manual_seed(0))
        >>> rank_r_hat(x) < 1.02 and rank_r_hat(x + torch.arange(4.0)[:, None]) > 1.5
        True
    """
    x = _as_2d(traces)
    if x.shape[1] < 4 or not np.all(np.isfinite(x)):
        return float("nan")
    if np.ptp(x) == 0:
        return 1.0
    xs = _split(x)
    bulk = _classic_r_hat(_normal_scores(xs))
    folded = np.abs(x - np.median(x))
    tail = _classic_r_hat(_normal_scores(_split(folded)))
    return max(bulk, tail)


def _autocov(x: np.ndarray) -> np.ndarray:
    """Biased autocovariance of every chain at every lag, by FFT. [chains, draws]"""
    n = x.shape[1]
    xc = x - x.mean(axis=1, keepdims=True)
    size = 1 << int(np.ceil(np.log2(2 * n - 1)))
    f = np.fft.rfft(xc, n=size, axis=1)
    return np.fft.irfft(f * np.conj(f), n=size, axis=1)[:, :n] / n


def _ess(x: np.ndarray) -> float:
    """ESS of chains ``x`` [chains, draws] by Geyer's initial monotone sequence (arviz-stats' ``_ess``)."""
    n_chain, n_draw = x.shape
    if n_draw < 4:
        return float("nan")
    if np.ptp(x) < np.finfo(np.float64).resolution:
        return float(x.size)
    acov = _autocov(x)
    mean_var = acov[:, 0].mean() * n_draw / (n_draw - 1.0)
    var_plus = mean_var * (n_draw - 1.0) / n_draw
    if n_chain > 1:
        var_plus += x.mean(axis=1).var(ddof=1)
    rho = np.zeros(n_draw)
    rho_even, rho_odd = 1.0, 1.0 - (mean_var - acov[:, 1].mean()) / var_plus
    rho[0], rho[1] = rho_even, rho_odd
    t = 1
    while t < n_draw - 3 and rho_even + rho_odd > 0.0:  # Geyer's initial positive sequence
        rho_even = 1.0 - (mean_var - acov[:, t + 1].mean()) / var_plus
        rho_odd = 1.0 - (mean_var - acov[:, t + 2].mean()) / var_plus
        if rho_even + rho_odd >= 0:
            rho[t + 1], rho[t + 2] = rho_even, rho_odd
        t += 2
    max_t = t - 2
    if rho_even > 0:
        rho[max_t + 1] = rho_even
    t = 1
    while t <= max_t - 2:  # Geyer's initial monotone sequence
        if rho[t + 1] + rho[t + 2] > rho[t - 1] + rho[t]:
            rho[t + 1] = rho[t + 2] = (rho[t - 1] + rho[t]) / 2.0
        t += 2
    total = n_chain * n_draw
    tau = -1.0 + 2.0 * rho[: max_t + 1].sum() + rho[max_t + 1 : max_t + 2].sum()
    tau = max(tau, 1.0 / np.log10(total))
    return float("nan") if np.isnan(rho).any() else float(total / tau)


def ess_bulk(traces: Any) -> float:
    """Bulk effective sample size of ``traces`` [chains, draws] (rank-normalised split chains)."""
    x = _as_2d(traces)
    if x.shape[1] < 4 or not np.all(np.isfinite(x)):
        return float("nan")
    return _ess(_normal_scores(_split(x)))


def ess_mean(traces: Any) -> float:
    """Effective sample size for the mean of ``traces`` [chains, draws] (split chains, raw values)."""
    x = _as_2d(traces)
    if x.shape[1] < 4 or not np.all(np.isfinite(x)):
        return float("nan")
    return _ess(_split(x))


def mcse_mean(traces: Any) -> float:
    """Monte-Carlo standard error of the mean of all draws: sd (ddof 1) / sqrt(ESS_mean)."""
    x = _as_2d(traces)
    ess = ess_mean(x)
    return float(x.std(ddof=1) / math.sqrt(ess)) if ess == ess and ess > 0 else float("nan")


#: blocks per chain whose means :func:`llc_standard_error` also feeds to :func:`mcse_mean`
SE_BLOCKS = 100


def llc_standard_error(traces: Any, *, n_blocks: int = SE_BLOCKS) -> float:
    """The standard error of the mean of ``traces`` [chains, draws]: the larger of :func:`mcse_mean` of the draws
    and :func:`mcse_mean` of the means of ``n_blocks`` consecutive blocks per chain (the leading remainder dropped;
    no blocking when a chain has fewer than 2·n_blocks draws).

    Why both: SGLD traces with cycled minibatches are a slow mode (autocorrelation time ≈ 1/(εγ) steps) carrying ~1%
    of the variance under large step-to-step noise (each batch's loss, the fast directions). Geyer's initial
    sequence on the raw draws cuts the autocorrelation sum where the slow mode's 1% drowns in the noise of the
    estimated autocorrelations, so the raw ``mcse_mean`` can be 2–3× too small (modadd-113: 0.38 against 1.0 from
    block means and 1.4 from the spread of the 4 chain means). Block means keep the slow mode and average the noise
    away; on white noise both agree (tests/test_llc_diagnostics.py).

    Example:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((4, 1000))
        >>> round(float(llc_standard_error(x) / (x.std() / np.sqrt(x.size))), 1)
        1.0
    """
    x = _as_2d(traces)
    raw = mcse_mean(x)
    k = x.shape[1] // n_blocks
    if k < 2:
        return raw
    blocks = x[:, x.shape[1] - k * n_blocks :].reshape(x.shape[0], n_blocks, k).mean(axis=2)
    blocked = mcse_mean(blocks)
    return max(raw, blocked) if blocked == blocked else raw


def plateau_test(traces: Any, *, z: float = PLATEAU_Z, rtol: float = PLATEAU_RTOL) -> dict[str, Any]:
    """Has the trace stopped rising (or falling)? The mean of the last quarter of the draws (all chains)
    against the mean of the quarter before, in units of their standard errors (each
    :func:`llc_standard_error` of its quarter: a slow mode under noise would otherwise shrink them and fail flat
    traces). Fails when the difference exceeds ``z`` standard errors and ``rtol`` of the mean.

    Returns ``{"ok", "drift", "se", "z", "mean"}`` (``drift`` = last − third quarter).

    Example:
        >>> import torch
        >>> g = torch.Generator().manual_seed(0)
        >>> flat = torch.randn(4, 400, generator=g)
        >>> plateau_test(flat)["ok"], plateau_test(flat + torch.linspace(0, 3, 400))["ok"]
        (True, False)
    """
    x = _as_2d(traces)
    n = x.shape[1]
    if n < 16 or not np.all(np.isfinite(x)):
        return {"ok": False, "drift": float("nan"), "se": float("nan"), "z": float("nan"), "mean": float("nan"),
                "reason": f"too few draws ({n}) for the plateau test" if n < 16 else "non-finite draws"}
    q = n // 4
    third, last = x[:, n - 2 * q : n - q], x[:, n - q :]
    drift = float(last.mean() - third.mean())
    se = math.hypot(llc_standard_error(third), llc_standard_error(last))
    mean = float(x.mean())
    zval = abs(drift) / se if se > 0 else (0.0 if drift == 0 else float("inf"))
    ok = not (zval > z and abs(drift) > rtol * abs(mean))
    return {"ok": bool(ok), "drift": drift, "se": se, "z": zval, "mean": mean}


def _shown(value: float, bound: float, kind: str, digits: int) -> str:
    """``value`` with ``digits`` digits (``kind`` "f" or "g"), more when that would print the bound itself: a
    failed check never reads "0.90 < 0.9"."""
    text = f"{value:.{digits}{kind}}"
    while float(text) == bound and digits < 8:
        digits += 1
        text = f"{value:.{digits}{kind}}"
    return text


def _acceptances(diag: dict[str, Any]) -> list[float]:
    """The live chains' measured MALA acceptances (missing and NaN left out)."""
    return [a for a in diag.get("mala_acceptance", []) if a is not None and a == a]


def verdict(diag: dict[str, Any]) -> tuple[bool, list[str]]:
    """``(converged, reasons)`` from an :class:`~tl_degeneracy.LLCResult`'s diagnostics.

    Converged means: mean MALA acceptance ≥ ``MIN_ACCEPTANCE`` and every live chain's ≥
    ``MIN_CHAIN_ACCEPTANCE``; rank-normalised R̂ ≤ ``MAX_R_HAT``; bulk ESS ≥ ``MIN_ESS``; the plateau test
    passed; no chain diverged. ``reasons`` names each failed check with its value."""
    reasons: list[str] = []
    acc = _acceptances(diag)
    if not acc:
        reasons.append("no MALA acceptance measured (mala_every=0)")
    elif sum(acc) / len(acc) < MIN_ACCEPTANCE:
        mean_acc = sum(acc) / len(acc)
        reasons.append(f"MALA acceptance {_shown(mean_acc, MIN_ACCEPTANCE, 'f', 2)} < {MIN_ACCEPTANCE} "
                       "(step_size too large)")
    elif min(acc) < MIN_CHAIN_ACCEPTANCE:
        reasons.append(f"MALA acceptance {_shown(min(acc), MIN_CHAIN_ACCEPTANCE, 'f', 2)} < {MIN_CHAIN_ACCEPTANCE} "
                       "in one chain (step_size too large)")
    r_hat = diag.get("r_hat_rank", float("nan"))
    if not r_hat == r_hat:
        reasons.append("R̂ not measurable")
    elif r_hat > MAX_R_HAT:
        reasons.append(f"R̂ {_shown(r_hat, MAX_R_HAT, 'g', 3)} > {MAX_R_HAT} (chains disagree)")
    ess = diag.get("ess_bulk", float("nan"))
    if not ess == ess:
        reasons.append("ESS not measurable")
    elif ess < MIN_ESS:
        reasons.append(f"ESS {ess:.0f} < {MIN_ESS:.0f} (too few effective draws: run longer)")
    plateau = diag.get("plateau_test") or {}
    if not plateau.get("ok", False):
        drift, z = plateau.get("drift", float("nan")), plateau.get("z", float("nan"))
        why = plateau.get("reason") or f"drift {drift:.3g} = {z:.1f} s.e."
        reasons.append(f"trace not on a plateau ({why}: run longer or raise the burn-in)")
    if diag.get("dropped_chains"):
        reasons.append(f"{len(diag['dropped_chains'])} chain(s) diverged")
    return not reasons, reasons


def needs_longer_chains(diag: dict[str, Any]) -> bool:
    """Whether longer chains can turn a "not converged" verdict into "converged": the verdict failed, but only on
    mixing (R̂, ESS or the plateau test), with a healthy MALA acceptance and no diverged chain. A failed acceptance
    (step too large) or a divergence is not fixed by running longer.

    Example::

        needs_longer_chains(result.diagnostics)   # True for R̂ 1.18 at acceptance 0.94
    """
    converged, _ = verdict(diag)
    if converged or diag.get("dropped_chains"):
        return False
    acc = _acceptances(diag)
    return bool(acc) and sum(acc) / len(acc) >= MIN_ACCEPTANCE and min(acc) >= MIN_CHAIN_ACCEPTANCE
