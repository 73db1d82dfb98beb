"""SGLD chains and nβ values spread over ``torch.distributed`` ranks (paper §2.1–2.2, SPEC §5).

Chains are independent, so chain c runs on rank c mod W as ``estimate_llc(..., n_chains=1, first_chain=c)``:
chain c draws its noise from a generator seeded by ``SeedSequence([seed, c])`` (:func:`~tl_degeneracy.sgld_llc`),
so the noise does not depend on the world size, and λ̂_c equals chain c of a single-process
``estimate_llc(..., n_chains=C, seed=seed)`` run one chain at a time (``vectorize=False``; batched chains
differ from it only by floating-point rounding). The per-chain results are gathered on every rank (one
``all_gather_object``) and combined into one :class:`~tl_degeneracy.LLCResult` with the same formulas as
:func:`~tl_degeneracy.sgld_llc` (mean and std over surviving chains, split-R̂, ε̂ = λ̂/nβ, N_eff = 2λ̂).
A sweep spreads its nβ values instead: run i on rank i mod W, each run exactly :func:`estimate_llc`.

Without a process group (or with W = 1) everything runs in this process, with the same per-chain seeds.

Example (``torchrun --nproc_per_node=2 script.py``)::

    torch.distributed.init_process_group("gloo")
    res = tld.estimate_llc_distributed(model, data, nbeta=1e3, step_size=1e-4, localization=100.0,
                                       n_steps=400, n_burnin=100, n_chains=8)   # 4 chains per rank
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from tl_degeneracy.errors import BadInputError, SamplerDivergedError, TLDegeneracyError
from tl_degeneracy.llc.behavioral import LLCScaleSweep, estimate_llc, sweep_localizations, sweep_steps
from tl_degeneracy.llc.sgld import LLCResult, split_r_hat


class RankFailedError(TLDegeneracyError, RuntimeError):
    """A rank of a distributed LLC estimate failed; the message names the rank and its error."""


def _rank_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather(payload: Any) -> list[Any]:
    """Every rank's ``payload`` on every rank (just ``[payload]`` without a process group)."""
    rank, world = _rank_world()
    if world == 1:
        return [payload]
    out: list[Any] = [None] * world
    dist.all_gather_object(out, payload)
    return out


def _run_share(n: int, run: Callable[[int], Any]) -> dict[int, Any]:
    """``run(i)`` for this rank's share of 0..n−1, gathered on every rank; any rank's error stops all."""
    rank, world = _rank_world()
    mine: dict[int, Any] = {}
    error = None
    for i in range(rank, n, world):
        try:
            mine[i] = run(i)
        except SamplerDivergedError as err:  # a diverged chain is a result, not a failure of the rank
            mine[i] = err
        except Exception as err:  # noqa: BLE001 - handed to every rank below
            error = f"{type(err).__name__}: {err}"
            break
    parts = _gather((mine, error))
    failed = [(r, e) for r, (_, e) in enumerate(parts) if e is not None]
    if failed:
        r, e = failed[0]
        raise RankFailedError(f"rank {r} of {world} failed with {e}")
    return {i: v for part, _ in parts for i, v in part.items()}


def estimate_llc_distributed(model: Any, data: Iterable[Any], *, n_chains: int = 4, seed: int = 0,
                             on_divergence: str = "raise", progress: bool = True, **options: Any) -> LLCResult:
    """:func:`~tl_degeneracy.estimate_llc` with its chains spread over the ranks of ``torch.distributed``.

    Chain c runs on rank c mod W as ``estimate_llc(..., n_chains=1, first_chain=c, seed=seed)``; the
    per-chain λ̂_c, loss traces and diagnostics are gathered on every rank and combined like
    :func:`~tl_degeneracy.sgld_llc` does (λ̂ = mean of λ̂_c over surviving chains, paper eq. 8; ε̂ = λ̂/nβ,
    N_eff = 2λ̂, eq. 9). Every rank returns the same result; ``settings`` records ``world_size`` and
    ``chain_seeding``. ``options`` go to :func:`estimate_llc` (nbeta, step_size, localization, n_steps, ...).

    Example::

        res = tld.estimate_llc_distributed(model, data, nbeta=1e3, step_size=1e-4, localization=100.0,
                                           n_steps=400, n_burnin=100, n_chains=8)
        res.llc_per_chain   # the same on 1, 2 or 8 processes
    """
    if n_chains < 1:
        raise BadInputError(f"n_chains must be >= 1, got {n_chains}")
    if on_divergence not in ("raise", "drop"):
        raise BadInputError(f"on_divergence must be 'raise' or 'drop', got {on_divergence!r}")
    rank, world = _rank_world()
    t0 = time.perf_counter()

    def one_chain(c: int) -> Any:
        res = estimate_llc(model, data, n_chains=1, first_chain=c, seed=seed, on_divergence="raise",
                           progress=progress and rank == 0, **options)
        return res.to_dict()

    outcomes = _run_share(n_chains, one_chain)
    result = _combine([outcomes[c] for c in range(n_chains)], seed=seed, world=world,
                      wall=max(_gather(time.perf_counter() - t0)))
    divergences = result.diagnostics["divergences"]
    if divergences:
        summary = "; ".join(d["message"] for d in divergences)
        alive = n_chains - len(divergences)
        if alive == 0 or on_divergence == "raise":
            err = SamplerDivergedError(f"{summary} ({alive}/{n_chains} chains survived: see err.result)")
            err.result = result if alive else None
            raise err
        warnings.warn(f"dropped {len(divergences)}/{n_chains} chains: {summary}", RuntimeWarning, stacklevel=2)
    return result


def _combine(chains: list[Any], *, seed: int, world: int, wall: float) -> LLCResult:
    """One LLCResult from per-chain ``LLCResult.to_dict()`` (or the SamplerDivergedError of a lost chain)."""
    ok = [c for c in chains if isinstance(c, dict)]
    if not ok:
        first = next(c for c in chains)
        raise SamplerDivergedError(f"every chain diverged: {first}")
    ref = ok[0]
    n_steps, nb, l_star = len(ref["loss_trace"][0]), float(ref["nbeta"]), float(ref["loss_at_optimum"])
    n_burnin = int(ref["n_burnin"])
    per_chain = torch.full((len(chains),), float("nan"), dtype=torch.float64)
    trace = torch.full((len(chains), n_steps), float("nan"), dtype=torch.float64)
    mala, plateau, divergences = [], [], []
    for c, ch in enumerate(chains):
        if isinstance(ch, dict):
            per_chain[c] = float(ch["llc_per_chain"][0])
            trace[c] = torch.tensor(ch["loss_trace"][0], dtype=torch.float64)
            mala.append(ch["diagnostics"]["mala_acceptance"][0])
            plateau.append(ch["diagnostics"]["plateau"][0])
        else:
            mala.append(float("nan"))
            plateau.append(None)
            divergences.append({"chain": c, "message": f"chain {c}: {ch}"})
    alive = torch.isfinite(per_chain)
    survivors = per_chain[alive]
    llc_mean = float(survivors.mean())
    llc_std = float(survivors.std(unbiased=True)) if survivors.numel() > 1 else float("nan")
    post = trace[alive, n_burnin:]
    diag = {
        "mala_acceptance": mala,
        "plateau": plateau,
        "r_hat": split_r_hat(nb * (post - l_star)),
        "dropped_chains": [d["chain"] for d in divergences],
        "divergences": divergences,
        "divergence_threshold": ref["diagnostics"]["divergence_threshold"],
        "vectorized": False,
        "n_sampled_entries": ref["diagnostics"]["n_sampled_entries"],
        "n_parameters": ref["diagnostics"]["n_parameters"],
        "wall_time_s": wall,
        "steps_per_s": n_steps / wall if wall > 0 else float("nan"),
    }
    settings = {**ref["settings"], "n_chains": len(chains), "seed": seed, "world_size": world,
                "chain_seeding": "chain c: numpy SeedSequence([seed, c])"}
    return LLCResult(llc_mean=llc_mean, llc_std=llc_std, llc_per_chain=per_chain, loss_trace=trace,
                     eps_hat=llc_mean / nb, n_eff=2.0 * llc_mean, nbeta=nb, loss_at_optimum=l_star,
                     n_burnin=n_burnin, diagnostics=diag, settings=settings)


def llc_scale_sweep_distributed(model: Any, data: Iterable[Any], *, nbetas: Sequence[float],
                                step_size: float | Sequence[float], localization: float, scale_step_size: bool = True,
                                scale_localization: bool = True, progress: bool = True,
                                **options: Any) -> LLCScaleSweep:
    """:func:`~tl_degeneracy.llc_scale_sweep` with its nβ values spread over the ranks (run i on rank i mod W).

    Each run is exactly ``estimate_llc(model, data, nbeta=nβ_i, step_size=ε_i, localization=γ_i, **options)``
    (step sizes and localizations as in :func:`~tl_degeneracy.llc_scale_sweep`: ε·nβ₀/nβ_i and γ·nβ_i/nβ₀ by
    default), so the sweep equals the single-process one; the results are gathered on every rank.

    Example::

        sweep = tld.llc_scale_sweep_distributed(model, data, nbetas=[1e2, 1e3, 1e4], step_size=1e-3,
                                                localization=10.0, n_steps=400, n_burnin=100)
    """
    nbetas, steps = sweep_steps(nbetas, step_size, scale_step_size=scale_step_size)
    gammas = sweep_localizations(nbetas, localization, scale_localization=scale_localization)
    rank, _ = _rank_world()

    def one_run(i: int) -> Any:
        return estimate_llc(model, data, nbeta=nbetas[i], step_size=steps[i], localization=gammas[i],
                            progress=progress and rank == 0, **options)

    runs = _run_share(len(nbetas), one_run)
    lost = [i for i, r in runs.items() if isinstance(r, SamplerDivergedError)]
    if lost:
        raise runs[lost[0]]
    return LLCScaleSweep([runs[i] for i in range(len(nbetas))])


__all__ = ["RankFailedError", "estimate_llc_distributed", "llc_scale_sweep_distributed"]
