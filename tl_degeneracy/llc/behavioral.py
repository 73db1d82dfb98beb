"""The local learning coefficient of a TransformerLens model's behavioral loss (paper §2.2, SPEC §5).

:func:`estimate_llc` samples the parameters of a model (all of them, or a named part: a layer, an MLP,
one attention head) around their trained values θ* with SGLD (:func:`tl_degeneracy.sgld_llc`) under the
behavioral loss

    L_B(θ) = mean over counted tokens of KL(p_θ*(·|context) ‖ p_θ(·|context)),

which is 0 exactly at θ* (the paper's eq. 6 with the KL divergence its footnote 3 suggests for language
models). λ̂ measured at nβ is the learning coefficient at the loss scale ε̂ = λ̂/nβ, and
N_eff(ε̂) = 2λ̂ (eq. 9); :func:`llc_scale_sweep` traces it over nβ.

The model is never modified: sampling runs the model as a function of the parameters
(``torch.func.functional_call``), in eval mode, and every parameter, mode flag and device is as before
when the call returns or raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple

import torch
from jaxtyping import Float
from torch import Tensor

from tl_degeneracy._io import read_json, write_json
from tl_degeneracy.adapter import FunctionalModel, ModelAdapter, parameter_masks, preserved_state
from tl_degeneracy.data import token_batches
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.llc.sgld import LLCResult, sgld_llc

__all__ = ["LLCScaleSweep", "estimate_llc", "llc_scale_sweep"]

LossKind = Literal["kl", "mse", "ce"]

#: the options of estimate_llc that llc_scale_sweep hands to each run
_SWEEP_OPTIONS = frozenset({
    "n_steps", "n_burnin", "n_chains", "seed", "sampler", "rmsprop_alpha", "rmsprop_eps",
    "on_divergence", "divergence_threshold", "vectorize", "mala_every", "progress",
})

#: teacher outputs are cached per batch when they take at most this many bytes in total (``cache_teacher="auto"``)
_CACHE_BYTES = 1 << 30


class _Batch(NamedTuple):
    tokens: Tensor  # [B, T] ids
    weight: Tensor  # [B, T] (kl, mse) or [B, T-1] (ce): 1.0 where a position counts
    teacher: Tensor | None  # kl: p_θ* [B, T, V]; mse: logits at θ* [B, T, V]; ce: None
    teacher_negent: Tensor | None  # kl: Σ_v p log p at θ* [B, T]


class _TeacherBatches:
    """Re-iterable token batches with the θ* outputs the loss compares against, cached or recomputed."""

    def __init__(self, adapter: ModelAdapter, data: Iterable[Any], loss: LossKind, cache: bool | str):
        self.adapter, self.loss = adapter, loss
        self.device = adapter.device
        n_rows = 0
        for b in data:
            if not (hasattr(b, "tokens") and hasattr(b, "mask")):
                raise BadInputError(
                    f"data must yield batches with .tokens and .mask (what tld.token_batches returns), got "
                    f"{type(b).__name__}"
                )
            if b.tokens.shape != b.mask.shape or b.tokens.ndim != 2:
                raise BadInputError("each batch needs tokens [B, T] and a mask of the same shape")
            n_rows += b.tokens.shape[0] * b.tokens.shape[1]
        if n_rows == 0:
            raise BadInputError("data holds no batch")
        data = even_batches(data)
        per_value = 2 if loss == "kl" else 1
        size = n_rows * adapter.d_vocab * 4 * per_value if loss != "ce" else 0
        self.data = data
        self.cache = size <= _CACHE_BYTES if cache == "auto" else bool(cache)
        self._cached: list[_Batch] | None = None

    def _prepare(self, b: Any) -> _Batch:
        tokens = b.tokens.to(self.device)
        mask = b.mask.to(self.device)
        if self.loss == "ce":
            weight = (mask[:, 1:]).float()  # the logits at t−1 predict the counted token at t
            return _Batch(tokens, weight, None, None)
        mask = getattr(b, "output_mask", b.mask).to(self.device)  # kl, mse: the loss lives at the output positions
        with torch.no_grad():
            logits = self.adapter.forward(tokens).float()
        if self.loss == "mse":
            return _Batch(tokens, mask.float(), logits, None)
        logp = torch.log_softmax(logits, dim=-1)
        p = logp.exp()
        return _Batch(tokens, mask.float(), p, (p * logp).sum(-1))

    def __iter__(self) -> Iterator[_Batch]:
        if self._cached is not None:
            yield from self._cached
            return
        fresh = []
        for b in self.data:
            item = self._prepare(b)
            if self.cache:
                fresh.append(item)
            yield item
        if self.cache:
            self._cached = fresh


class _Rows(NamedTuple):
    tokens: Tensor  # [B, T]
    mask: Tensor  # [B, T]


def even_batches(data: Iterable[Any]) -> Iterable[Any]:
    """The same rows in batches whose sizes differ by at most one (same number of batches, same order).

    SGLD takes one step per batch, and the loss of a step is the mean over that batch's counted tokens: a
    short last batch (9 rows at batch size 8: 8 + 1) makes every other step a far noisier one. Batches already
    within one row of each other, or of different lengths T, are returned as given.
    """
    batches = list(data)
    sizes = [int(b.tokens.shape[0]) for b in batches]
    if max(sizes) - min(sizes) <= 1 or len({b.tokens.shape[1] for b in batches}) > 1:
        return data
    tokens = torch.cat([b.tokens for b in batches])
    mask = torch.cat([b.mask for b in batches])
    rows = int(tokens.shape[0])
    n = min(len(batches), rows)
    bounds = [round(i * rows / n) for i in range(n + 1)]
    return [_Rows(tokens[a:b], mask[a:b]) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def behavioral_loss(logits: Float[Tensor, "batch pos vocab"], batch: _Batch, loss: LossKind) -> Float[Tensor, ""]:
    """The loss of logits against the θ* outputs of ``batch``, averaged over counted positions.

    - ``"kl"``: L_B = mean_t Σ_v p*_v (log p*_v − log p_θ,v), p* = p_θ* (paper eq. 6 with the KL of its
      footnote 3); 0 exactly at θ*.
    - ``"mse"``: mean_t ‖z_θ − z_θ*‖² over the logits z (paper eq. 6 as printed).
    - ``"ce"``: mean over counted tokens x_t (t ≥ 1) of −log p_θ(x_t | x_<t).
    """
    if loss == "ce":
        logq = torch.log_softmax(logits[:, :-1].float(), dim=-1)
        nll = -logq.gather(-1, batch.tokens[:, 1:, None]).squeeze(-1)
        return (nll * batch.weight).sum() / batch.weight.sum().clamp_min(1.0)
    if loss == "mse":
        per_token = ((logits.float() - batch.teacher) ** 2).sum(-1)
    else:
        logq = torch.log_softmax(logits.float(), dim=-1)
        per_token = batch.teacher_negent - (batch.teacher * logq).sum(-1)
    return (per_token * batch.weight).sum() / batch.weight.sum().clamp_min(1.0)  # a batch may count none


def estimate_llc(
    model: Any,
    data: Iterable[Any],
    *,
    loss: LossKind = "kl",
    params: str | Sequence[str] | Mapping[str, Tensor] = "all",
    nbeta: float,
    step_size: float,
    localization: float,
    n_steps: int,
    n_burnin: int,
    n_chains: int = 4,
    seed: int = 0,
    first_chain: int = 0,
    sampler: Literal["sgld", "rmsprop_sgld"] = "sgld",
    rmsprop_alpha: float = 0.999,
    rmsprop_eps: float = 0.1,
    on_divergence: Literal["raise", "drop"] = "raise",
    divergence_threshold: float | None = None,
    vectorize: Literal["auto"] | bool = "auto",
    cache_teacher: bool | Literal["auto"] = "auto",
    mala_every: int | Literal["auto"] = "auto",
    progress: bool = True,
) -> LLCResult:
    """Local learning coefficient of the behavioral loss of a TransformerLens model (paper §2.2, eq. 6–9).

    Samples p(w) ∝ exp(−nβ·L(w) − (γ/2)‖w − w*‖²) over the selected parameters w (the rest stay at θ*)
    with :func:`~tl_degeneracy.sgld_llc` and returns λ̂ = nβ·(E L − L(θ*)) with ε̂ = λ̂/nβ and
    N_eff(ε̂) = 2λ̂.

    Args:
        model: a TransformerLens model (4.x ``TransformerBridge`` or 3.x ``HookedTransformer``).
        data: what :func:`tl_degeneracy.token_batches` returns (batches with ``.tokens`` [B, T] and
            ``.mask`` [B, T]); cycled for as long as the chains run, every chain seeing the same batch at
            the same step.
        loss: ``"kl"`` (default) L_B(θ) = mean over counted tokens of KL(p_θ* ‖ p_θ), with L_B(θ*) = 0;
            ``"mse"`` the paper's eq. 6 on the logits, also 0 at θ*; ``"ce"`` the next-token loss on the
            counted tokens, L(θ*) measured on the same batches and subtracted.
        params: which parameters move: ``"all"``, ``"embed"``, ``"unembed"``, ``"blocks.{l}"``,
            ``"blocks.{l}.attn"``, ``"blocks.{l}.mlp"``, ``"blocks.{l}.attn.h{h}"`` (head h's slices of
            W_Q, W_K, W_V, W_O, b_Q, b_K, b_V), any other name of
            :func:`tl_degeneracy.model.parameter_selections`, a list of these, or a dict of masks keyed
            like :class:`tl_degeneracy.model.FunctionalModel` ``.parameters``.
        nbeta, step_size, localization, n_steps, n_burnin, n_chains, seed, first_chain, sampler: as in
            :func:`~tl_degeneracy.sgld_llc` (``n_steps`` counts the burn-in).
        rmsprop_alpha, rmsprop_eps, on_divergence, divergence_threshold, vectorize, mala_every, progress: as
            in :func:`~tl_degeneracy.sgld_llc`.
        cache_teacher: keep θ*'s output distributions of every batch in memory (``"auto"``: when they
            take at most 1 GiB), or recompute them each step with one forward pass without gradient.

    Returns:
        :class:`~tl_degeneracy.LLCResult`; ``settings`` records the loss, the selection, the number of
        counted tokens and the model's description.

    Example::

        data = tld.token_batches(model, "stdlib-heldout", seq_len=64, batch_size=8, n_tokens=4096)
        res = tld.estimate_llc(model, data, params="blocks.3.attn.h5", nbeta=1e3, step_size=1e-4,
                               localization=100.0, n_steps=400, n_burnin=100)
        print(res)   # λ̂ = ... ± ..., ε̂ = ..., N_eff = ...
    """
    sampler_options = {
        "n_chains": n_chains, "seed": seed, "first_chain": first_chain, "sampler": sampler,
        "rmsprop_alpha": rmsprop_alpha,
        "rmsprop_eps": rmsprop_eps, "on_divergence": on_divergence, "divergence_threshold": divergence_threshold,
        "vectorize": vectorize, "mala_every": mala_every, "progress": progress,
    }
    with _session(model, data, loss, cache_teacher) as run:
        return run(params, nbeta=nbeta, step_size=step_size, localization=localization, n_steps=n_steps,
                   n_burnin=n_burnin, **sampler_options)


class _Session:
    """What every estimate on one model, data and loss shares: the functional model, θ*, the teacher batches
    (θ*'s outputs, cached once) and the masks of each selection. Calling it runs one estimate."""

    def __init__(self, model: Any, data: Iterable[Any], loss: LossKind, cache_teacher: bool | str):
        if loss not in ("kl", "mse", "ce"):
            raise BadInputError(f"loss must be 'kl', 'mse' or 'ce', got {loss!r}")
        self.adapter = ModelAdapter(model)
        self.net = self.adapter.model
        if isinstance(data, Tensor):
            data = token_batches(self.net, data, batch_size=max(1, data.shape[0]))
        self.data, self.loss, self.cache_teacher = data, loss, cache_teacher

    def open(self) -> None:
        """Build the shared parts (inside the model's preserved state and eval mode)."""
        self.fm = FunctionalModel(self.net)
        self.w_star = {name: p.detach() for name, p in self.fm.parameters.items()}
        self.batches = _TeacherBatches(self.adapter, self.data, self.loss, self.cache_teacher)
        self.n_counted = sum(int(b.mask.sum()) for b in self.data)
        self._masks: dict[str, dict[str, Tensor] | None] = {}

    def masks(self, params: str | Sequence[str] | Mapping[str, Tensor]) -> dict[str, Tensor] | None:
        if isinstance(params, Mapping):
            unknown = sorted(set(params) - set(self.fm.parameters))
            if unknown:
                raise BadInputError(
                    f"masks name parameters the model does not have: {unknown[:5]}; use the names of "
                    "tl_degeneracy.model.FunctionalModel(model).parameters or a selection string"
                )
            return dict(params)
        key = params if isinstance(params, str) else "\0".join(params)
        if key not in self._masks:  # "all" too: on a 4.x bridge that leaves out parameters the forward never reads
            self._masks[key] = parameter_masks(self.net, params)
        return self._masks[key]

    def loss_fn(self, values: dict[str, Tensor], batch: _Batch) -> Tensor:
        return behavioral_loss(self.fm(values, batch.tokens), batch, self.loss)

    def __call__(self, params: str | Sequence[str] | Mapping[str, Tensor], **sgld_options: Any) -> LLCResult:
        result = sgld_llc(self.loss_fn, self.w_star, self.batches, masks=self.masks(params),
                          loss_at_optimum=None if self.loss == "ce" else 0.0, **sgld_options)
        result.settings.update(
            {
                "loss": self.loss,
                "params": params if isinstance(params, str) else "masks" if isinstance(params, Mapping)
                else list(params),
                "n_counted_tokens": self.n_counted,
                "model": self.adapter.describe(),
            }
        )
        return result


@contextlib.contextmanager
def _session(model: Any, data: Iterable[Any], loss: LossKind, cache_teacher: bool | str) -> Iterator[_Session]:
    """A :class:`_Session` for the duration of the block; the model's parameters, modes and devices are as
    before when it ends or raises."""
    session = _Session(model, data, loss, cache_teacher)
    with preserved_state(session.net), session.adapter.eval_mode():
        session.open()
        yield session


@dataclass
class LLCScaleSweep:
    """λ̂ against the loss scale: one :class:`~tl_degeneracy.LLCResult` per nβ (paper §2.2.2, eq. 8–9).

    ``eps_hat[i]`` is the measured loss scale ε̂ = λ̂/nβ of run i and ``n_eff[i]`` = N_eff(ε̂) = 2λ̂;
    larger nβ probes smaller ε̂.
    """

    results: list[LLCResult]

    @property
    def nbetas(self) -> Float[Tensor, " runs"]:
        return torch.tensor([r.nbeta for r in self.results], dtype=torch.float64)

    @property
    def llc(self) -> Float[Tensor, " runs"]:
        return torch.tensor([r.llc_mean for r in self.results], dtype=torch.float64)

    @property
    def llc_std(self) -> Float[Tensor, " runs"]:
        return torch.tensor([r.llc_std for r in self.results], dtype=torch.float64)

    @property
    def eps_hat(self) -> Float[Tensor, " runs"]:
        return torch.tensor([r.eps_hat for r in self.results], dtype=torch.float64)

    @property
    def n_eff(self) -> Float[Tensor, " runs"]:
        return torch.tensor([r.n_eff for r in self.results], dtype=torch.float64)

    def rows(self) -> list[dict[str, float]]:
        """One dict per run: nbeta, step_size, localization, llc, llc_se, llc_std, eps_hat, n_eff, verdict."""
        return [
            {
                "nbeta": r.nbeta,
                "step_size": float(r.settings["step_size"]),
                "localization": float(r.settings.get("localization", float("nan"))),
                "llc_se": r.llc_se,
                "verdict": r.verdict,
                "llc": r.llc_mean,
                "llc_std": r.llc_std,
                "eps_hat": r.eps_hat,
                "n_eff": r.n_eff,
            }
            for r in self.results
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows(), "results": [r.to_dict() for r in self.results]}

    def save(self, path: str | Path) -> Path:
        """Folder ``path`` with ``sweep.json`` (the rows) and one :meth:`LLCResult.save` folder per run."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for i, r in enumerate(self.results):
            r.save(folder / f"run_{i:03d}")
        write_json(folder / "sweep.json", {"rows": self.rows(), "n_runs": len(self.results)}, indent=2)
        return folder

    @classmethod
    def load(cls, path: str | Path) -> LLCScaleSweep:
        folder = Path(path)
        if not (folder / "sweep.json").is_file():
            raise BadInputError(f"{folder} holds no saved LLCScaleSweep (sweep.json)")
        n = int(read_json(folder / "sweep.json")["n_runs"])
        return cls([LLCResult.load(folder / f"run_{i:03d}") for i in range(n)])



def sweep_steps(nbetas: Sequence[float], step_size: float | Sequence[float], *,
                scale_step_size: bool) -> tuple[list[float], list[float]]:
    """The nβ values of a sweep and each one's step size (checked): one ``step_size`` scaled as ε·nβ₀/nβ_i
    (``scale_step_size``) or repeated, or one step size per nβ. Example: ``sweep_steps([1e2, 1e3], 1e-3,
    scale_step_size=True)`` → ``([100.0, 1000.0], [0.001, 0.0001])``."""
    nbetas = [float(nb) for nb in nbetas]
    if not nbetas:
        raise BadInputError("nbetas is empty")
    if isinstance(step_size, (int, float)):
        steps = [step_size * nbetas[0] / nb for nb in nbetas] if scale_step_size else [step_size] * len(nbetas)
    else:
        steps = [float(s) for s in step_size]
        if len(steps) != len(nbetas):
            raise BadInputError(f"{len(steps)} step sizes for {len(nbetas)} values of nbeta")
    if any(not (s > 0 and math.isfinite(s)) for s in steps):
        raise BadInputError(f"step sizes must be positive, got {steps}")
    return nbetas, steps


def sweep_localizations(nbetas: Sequence[float], localization: float, *, scale_localization: bool) -> list[float]:
    """Each sweep run's localization γ_i: γ·nβ_i/nβ₀ (``scale_localization``), or γ for every run.

    Scaling γ with nβ keeps the localization a fixed term γ/(2nβ)·‖w − w*‖² of the loss, so every run samples
    exp(−nβ_i·(L + γ/(2nβ₀)‖w − w*‖²)): the same localized loss at another temperature. With the step scaled as
    ε·nβ₀/nβ_i both ε·nβ_i and ε·γ_i stay fixed, so every run has the base run's MALA acceptance and
    equilibration time (≈ 1/(ε·γ) steps) and the same burn-in serves all. Example:
    ``sweep_localizations([1e3, 3e3], 100.0, scale_localization=True)`` → ``[100.0, 300.0]``.
    """
    if not (localization >= 0 and math.isfinite(localization)):
        raise BadInputError(f"localization must be >= 0, got {localization}")
    nbetas = [float(nb) for nb in nbetas]
    if not scale_localization:
        return [float(localization)] * len(nbetas)
    return [localization * nb / nbetas[0] for nb in nbetas]


def llc_scale_sweep(
    model: Any,
    data: Iterable[Any],
    *,
    nbetas: Sequence[float],
    step_size: float | Sequence[float],
    localization: float,
    scale_step_size: bool = True,
    scale_localization: bool = True,
    **options: Any,
) -> LLCScaleSweep:
    """:func:`estimate_llc` at several nβ: λ_B against the measured loss scale ε̂ (paper §2.2.2, eq. 8–9).

    Each run reports ε̂ = λ̂/nβ (the mean sampled behavioral loss) and N_eff(ε̂) = 2λ̂. ``step_size`` and
    ``localization`` are the settings of the first nβ (nβ₀ = ``nbetas[0]``). With ``scale_step_size`` the i-th run's
    step is ε·nβ₀/nβ_i, keeping ε·nβ·h — what decides the stability of SGLD on curvature h — fixed (a sequence
    gives each run its own step size); with ``scale_localization`` its localization is γ·nβ_i/nβ₀
    (:func:`sweep_localizations`), keeping ε·γ and so the acceptance and equilibration time of every run those of
    the first: a sweep calibrated at one nβ (:func:`~tl_degeneracy.calibrate_llc`) stays calibrated at the others.
    With a fixed γ instead, the large-nβ runs equilibrate ∝ nβ more slowly and the small-nβ runs lose MALA
    acceptance. ``options`` go to :func:`estimate_llc` (loss, params, n_steps, ...).

    Example::

        sweep = tld.llc_scale_sweep(model, data, nbetas=[1e2, 1e3, 1e4], step_size=1e-3, localization=10.0,
                                    n_steps=400, n_burnin=100)
        for row in sweep.rows(): print(row["eps_hat"], row["n_eff"], row["verdict"])
    """
    nbetas, steps = sweep_steps(nbetas, step_size, scale_step_size=scale_step_size)
    gammas = sweep_localizations(nbetas, localization, scale_localization=scale_localization)
    loss = options.pop("loss", "kl")
    cache_teacher = options.pop("cache_teacher", "auto")
    params = options.pop("params", "all")
    unknown = sorted(set(options) - _SWEEP_OPTIONS)
    if unknown:
        raise BadInputError(f"unknown option(s) {unknown} for estimate_llc")
    with _session(model, data, loss, cache_teacher) as run:  # masks, functional model, teacher cache: once
        return LLCScaleSweep([run(params, nbeta=nb, step_size=s, localization=g, **options)
                              for nb, s, g in zip(nbetas, steps, gammas, strict=True)])
