"""Output-logit Jacobian statistics at every site, one backward pass per probe (SPEC §2).

For the activation a_t of a site at a counted token t, J_{s,t} = ∂o_s/∂a_t, where o_s ∈ R^V are the logits at a
counted output position s of the same sequence (J_{s,t} = 0 for s < t: the model is causal). With an output
metric F_s the statistic is

    M = (1/N) Σ_t J_tᵀ F J_t = (1/N) Σ_t Σ_s J_{s,t}ᵀ F_s J_{s,t}                                    (SPEC §2)

- ``metric="kl"``: F_s = diag(p_s) − p_s p_sᵀ with p_s = softmax(o_s), the Hessian of the behavioural loss
  KL(p_θ* ‖ p_θ) with respect to the logits at θ* (paper footnotes 3 and 5);
- ``metric="mse"``: F_s = I, the Hessian of ½‖o − o*‖² (paper eq. 6, 39–40).

This module adds the per-batch sums ``jac/{site}/n`` (counted tokens) and ``jac/{site}/outer`` = Σ_t g_t g_tᵀ
(averaged over probes), so that ``Stats.jacobian_gram(site)`` = M.

Estimators (both unbiased; ``exact`` is the oracle of the tests):

- ``probe`` (default): K probes per batch. A probe puts an independent draw u_s with E[u_s] = 0 and
  E[u_s u_sᵀ] = F_s at every counted output position (u_s = 0 elsewhere) — kl: u_s = e_{y_s} − p_s with
  y_s ~ Categorical(p_s); mse: independent Rademacher entries. One backward pass of u through the model gives
  g_t = Σ_s J_{s,t}ᵀ u_s = J_tᵀ u at every site at once, and since draws at different positions are independent
  with mean zero, E[g_t g_tᵀ] = Σ_s J_{s,t}ᵀ F_s J_{s,t}. Increment: Σ_t g_t g_tᵀ / K. Cost per batch: one
  forward and K backward passes for all sites together; no weight gradient is computed.
- ``exact``: one backward pass per counted output position s and per column c of a square root L_s of F_s
  (L_s L_sᵀ = F_s), so Σ_c g_{s,c} g_{s,c}ᵀ = J_{s,t}ᵀ F_s J_{s,t} exactly. kl: L_s = diag(√p_s) − p_s √p_sᵀ,
  whose column c is √p_{s,c} (e_c − p_s); mse: L_s = I. Sequences of a batch do not interact, so position s of
  every sequence is probed in the same pass: T · V backward passes per batch, for tiny models only.

Where the backward pass starts (ECOSYSTEM.md §4). When the logits are the affine map o = x W_U + b_U of the
unembedding input x (the adapter says so and every batch checks it on a few tokens), a logit cotangent u_s
becomes the cotangent W_U u_s at x, and the pass starts there: by the chain rule every site receives the same
gradient for the same draws, so the estimator is unchanged. For kl, W_U (e_y − p) = W_U[:, y] − W_U p: one
d×V product per token (W_U p), shared by the K probes, then a column gather per probe, instead of a dense
[tokens, V] probe and a d×V product through the unembedding per probe. Otherwise (a soft-capped or rescaled
unembedding) the pass starts at the logits with u itself.

Gradients are read from backward hooks, which fire on every backward pass and give ∂/∂(hooked activation) also
where a forward hook's tensor is not the one the forward uses (``attn.hook_z``; ECOSYSTEM.md gotcha 3). A site
may need several hooks (``ModelAdapter.gradient_hooks``: on 4.x ``hook_resid_mid`` is the input of ln2 only, and
the residual skip adds the gradient at ``hook_resid_post``). The input of the model is cut at a forward hook that
returns ``act.detach().requires_grad_(True)`` at the residual stream before the earliest site, so frozen
parameters never receive gradients; that hook's own gradient is the return value of ``torch.autograd.grad``.

Example::

    stats = tld.collect(model, data, sites=tld.resolve_sites(model, ["resid_pre", "mlp_post"]),
                        jacobian="kl", n_probes=4, seed=0)
    M = stats.jacobian_gram("blocks.3.hook_resid_pre")       # (d_model, d_model), float64
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_degeneracy.adapter import ModelAdapter, as_adapter
from tl_degeneracy.collection.engine import BatchContext, Component, Hook, check_finite, flatten_site
from tl_degeneracy.collection.kernels import sample_categorical, softmax_rows_
from tl_degeneracy.collection.probes import topk_tail_draws
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import hook_name, site_kind, site_layer

METRICS = ("kl", "mse")
ESTIMATORS = ("probe", "exact", "topk")

#: rows of the batch on which the affine unembedding o = x W_U + b_U is checked before the pass starts at x
_UNEMBED_CHECK_ROWS = 8


def leaf_hook(adapter: ModelAdapter, sites: Sequence[str]) -> str:
    """The hook where the backward passes stop: the residual stream before the earliest site.

    ``blocks.{l}.hook_resid_pre`` of the lowest layer among the sites (every hook of block l lies downstream of
    its input), or ``blocks.{L-1}.hook_resid_post`` when every site is in ``ln_final``. Sites outside the
    blocks other than ``ln_final.*`` (embeddings, the unembedding) and attention patterns are refused.
    """
    layers = []
    for site in sites:
        if site_kind(site) == "attn_pattern":
            raise BadInputError(f"'{site}': attention patterns are not vector sites; no Jacobian statistics there")
        layer = site_layer(site)
        if layer is None and not site.startswith("ln_final."):
            raise BadInputError(
                f"'{site}': Jacobian statistics are computed at sites inside the blocks and in ln_final only"
            )
        if layer is not None:
            layers.append(layer)
    if not sites:
        raise BadInputError("no sites given for Jacobian statistics")
    return hook_name("resid_pre", min(layers)) if layers else hook_name("resid_post", adapter.n_layers - 1)


@dataclass
class _OutputMap:
    """Where a backward pass starts: ``z`` (the logits, or the unembedding input x) and the map of cotangents.

    A logit cotangent u (a row vector over the vocabulary) becomes u A at z: A = I when z are the logits
    (``A is None``), A = W_Uᵀ [V, d_model] when z = x and o = x W_U + b_U.
    """

    z: torch.Tensor
    A: Float[torch.Tensor, "vocab d"] | None
    d_vocab: int

    def rows(self, y: Int[torch.Tensor, " n"], dtype: torch.dtype) -> Float[torch.Tensor, "n d"]:
        """e_y A: rows of A (one-hot rows when A = I)."""
        if self.A is None:
            return torch.nn.functional.one_hot(y, self.d_vocab).to(dtype)
        return self.A[y].to(dtype)

    def apply(self, u: Float[torch.Tensor, "n vocab"]) -> Float[torch.Tensor, "n d"]:
        """u A."""
        return u if self.A is None else u @ self.A.to(u.dtype)


@dataclass
class _BatchState:
    """What this component's hooks share during one batch; owned by the batch's ``ctx.scratch`` and cleared
    with it (the unembedding input leads back through its ``grad_fn`` to the backward hooks, whose closures
    reach this state: a cycle through C++ that only clearing breaks)."""

    leaf: torch.Tensor | None = None
    unembed_in: torch.Tensor | None = None
    grads: dict[str, torch.Tensor] = field(default_factory=dict)

    def clear(self) -> None:
        self.leaf = self.unembed_in = None
        self.grads = {}


class JacobianMoments(Component):
    """Streams Σ_t g_t g_tᵀ with E[g_t g_tᵀ] = J_tᵀ F J_t at every site (module docstring; SPEC §2).

    ``metric``: ``"kl"`` (F_s = diag(p_s) − p_s p_sᵀ) or ``"mse"`` (F_s = I). ``estimator``: ``"probe"`` (K =
    ``n_probes`` backward passes per batch, probes drawn with the batch's seeded generator, so a resumed run
    draws the same ones), ``"exact"`` (T · V backward passes per batch) or, for ``"kl"`` on peaked output
    distributions, ``"topk"`` (the ``top_k`` largest columns of F^{1/2} exactly plus K sampled tail probes:
    :mod:`tl_degeneracy.collection.probes`).
    """

    needs_logits = True
    meta_key = "JacobianMoments"

    def __init__(
        self, adapter: Any, sites: Sequence[str], *, metric: str = "kl", estimator: str = "probe", n_probes: int = 1,
        top_k: int = 8,
    ):
        if metric not in METRICS:
            raise BadInputError(f"metric must be one of {METRICS}, got {metric!r}")
        if estimator not in ESTIMATORS:
            raise BadInputError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if n_probes < 1:
            raise BadInputError(f"n_probes must be >= 1, got {n_probes}")
        if estimator == "topk" and (metric != "kl" or top_k < 1):
            raise BadInputError(f"estimator='topk' needs jacobian='kl' and top_k >= 1, got {metric!r}, top_k={top_k}")
        self.top_k = int(top_k)
        self.adapter = as_adapter(adapter)
        self.sites = list(dict.fromkeys(sites))
        self.metric, self.estimator, self.n_probes = metric, estimator, int(n_probes)
        self.leaf = leaf_hook(self.adapter, self.sites)
        self.gradient_hooks = {site: self.adapter.gradient_hooks(site) for site in self.sites}
        self.unembedding = self.adapter.unembedding()
        if self.unembedding is not None:  # ‖W_U[:, j]‖ for the per-batch check of o = x W_U + b_U
            self._unembed_col_norms = self.unembedding.W_U.float().norm(dim=0)
        self._warned_fallback = False

    # ---- Component interface ----------------------------------------------------------------------
    def hook_names(self) -> list[str]:
        names = [self.leaf, *self.sites, *(h for hooks in self.gradient_hooks.values() for h in hooks)]
        if self.unembedding is not None:
            names.append(self.unembedding.hook)
        return list(dict.fromkeys(names))

    def meta(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "F": "diag(p) - p p^T, p = softmax(logits)" if self.metric == "kl" else "identity",
            "estimator": self.estimator,
            "n_probes": self.n_probes if self.estimator != "exact" else None,
            "probe": {"probe": "e_y - p, y ~ Categorical(p)" if self.metric == "kl" else "Rademacher",
                      "exact": "columns of a square root of F",
                      "topk": "signed top-k columns of a square root of F, and signed sqrt(P_tail) (e_y - p), "
                              "y ~ p restricted to the tail"}[self.estimator],
            **({"top_k": self.top_k} if self.estimator == "topk" else {}),
            "leaf_hook": self.leaf,
            "cotangent_space": "unembedding input (d_model)" if self.unembedding is not None else "logits",
        }

    def fwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        state = self._batch_state(ctx)

        def cut(act: torch.Tensor, hook: Any) -> torch.Tensor:
            state.leaf = act.detach().requires_grad_(True)
            return state.leaf

        hooks: list[Hook] = [(self.leaf, cut)]
        if self.unembedding is not None:

            def capture(act: torch.Tensor, hook: Any) -> None:
                state.unembed_in = act

            hooks.append((self.unembedding.hook, capture))
        return hooks

    def bwd_hooks(self, ctx: BatchContext) -> list[Hook]:
        state = self._batch_state(ctx)

        def make(site: str) -> Callable[..., None]:
            def hook(grad: torch.Tensor, hook: Any) -> None:
                g = grad.detach()
                state.grads[site] = state.grads[site] + g if site in state.grads else g

            return hook

        return [(name, make(site)) for site, names in self.gradient_hooks.items() for name in names
                if name != self.leaf]

    def after_forward(self, ctx: BatchContext, logits: torch.Tensor | None) -> None:
        state = self._batch_state(ctx)
        try:
            if logits is None or state.leaf is None:
                raise RuntimeError(f"the forward pass did not reach both '{self.leaf}' and the logits")
            check_finite(logits.detach(), "the logits", ctx)
            n = int(ctx.mask.sum())
            for site in self.sites:
                ctx.add(f"jac/{site}/n", torch.tensor(n, dtype=torch.int64))
            out_mask = ctx.output_mask  # the output positions s (SPEC §5b); the gradients g_t count at ctx.mask
            n_out = int(out_mask.sum())
            if n == 0 or n_out == 0:  # a batch of padding only (or no output position): nothing to add
                return
            work = torch.promote_types(logits.dtype, torch.float32)
            # p_s at the output positions (kl only: F = I needs no probabilities)
            # the boolean gather copies the output rows; the softmax then runs in place on that copy
            p = softmax_rows_(logits.detach()[out_mask].to(work)) if self.metric == "kl" else None
            out = self._output_map(ctx, state, logits, work)
            positions = out_mask.nonzero()  # [n_out, 2] (sequence, position), in the order of z[out_mask]
            if self.estimator == "probe":
                draws = self._probes(ctx, out, p, n_out, work)
            elif self.estimator == "topk":
                draws = topk_tail_draws(p, out.apply(p), lambda y: out.rows(y, work), top_k=self.top_k,
                                        n_tail=self.n_probes, generator=ctx.generator)
            else:
                draws = self._exact_columns(out, p, positions, work)
            outer: dict[str, torch.Tensor] = {}  # Σ over draws of weight · Σ_t g_t g_tᵀ, accumulated in place
            for weight, rows, v in draws:
                cotangent = out.z.new_zeros(out.z.shape)
                cotangent[positions[rows, 0], positions[rows, 1]] = v.to(out.z.dtype)
                for site, g in self._backward(state, out.z, cotangent).items():
                    g = flatten_site(g, site)[ctx.mask]
                    check_finite(g, f"the output-Jacobian gradient at site '{site}'", ctx)
                    if site not in outer:  # the first draw's Gram is the running sum (×1: no rounding)
                        inc = ctx.gram(g, buffer=f"jac/{site}/outer")
                        outer[site] = inc if weight == 1.0 else inc.mul_(weight)
                    else:
                        inc = ctx.gram(g, buffer=f"jac/{site}/draw")
                        outer[site].add_(inc if weight == 1.0 else inc.mul_(weight))
            for site, total in outer.items():
                ctx.add(f"jac/{site}/outer", total)
        finally:  # run_batch clears ctx.scratch too; clearing here frees the graph before the next component
            state.clear()

    # ---- internals --------------------------------------------------------------------------------
    def _batch_state(self, ctx: BatchContext) -> _BatchState:
        """This component's state for the batch of ``ctx`` (created on first use, kept in ``ctx.scratch``)."""
        return ctx.scratch.setdefault(("JacobianMoments", id(self)), _BatchState())

    def _output_map(
        self, ctx: BatchContext, state: _BatchState, logits: torch.Tensor, work: torch.dtype
    ) -> _OutputMap:
        """Start at the unembedding input x when o = x W_U + b_U holds on this batch, else at the logits.

        The check compares o_j with x W_U[:, j] + b_j on a few counted tokens, to within
        16 ε (‖x‖ ‖W_U[:, j]‖ + |b_j|) (ε of the lowest precision involved; the column norms are computed once).
        Rounding of a length-d float sum stays near ε ‖(x_i W_ij)_i‖₂ ≤ ε ‖x‖ ‖W_U[:, j]‖ in practice, far inside
        the threshold, while a rescaling or a soft cap of the logits that matters exceeds it by orders of
        magnitude. A false alarm only costs speed.
        """
        un = self.unembedding
        if un is None or state.unembed_in is None:
            return _OutputMap(logits, None, logits.shape[-1])
        x = state.unembed_in
        if x.shape[:-1] != logits.shape[:-1]:
            return _OutputMap(logits, None, logits.shape[-1])
        idx = ctx.output_mask.nonzero()[:_UNEMBED_CHECK_ROWS]
        xr = x.detach()[idx[:, 0], idx[:, 1]].to(work)
        W_U, b_U = un.W_U.to(work), un.b_U.to(work)
        err = (xr @ W_U + b_U - logits.detach()[idx[:, 0], idx[:, 1]].to(work)).abs()
        eps = max(torch.finfo(t.dtype).eps for t in (x, logits, un.W_U))
        tol = 16 * eps * (xr.norm(dim=-1, keepdim=True) * self._unembed_col_norms.to(work) + b_U.abs())
        if bool((err <= tol).all()):
            return _OutputMap(x, un.W_U.T, logits.shape[-1])
        if not self._warned_fallback:
            self._warned_fallback = True
            warnings.warn(
                f"the logits are not x W_U + b_U of the input x at '{un.hook}' (max error {float(err.max()):.3g}); "
                "Jacobian probes start at the logits instead (same estimator, slower)", stacklevel=2,
            )
        return _OutputMap(logits, None, logits.shape[-1])

    def _probes(
        self, ctx: BatchContext, out: _OutputMap, p: Float[torch.Tensor, "n vocab"] | None, n: int,
        work: torch.dtype,
    ) -> Iterator[tuple[float, slice, torch.Tensor]]:
        """K probes (weight 1/K each) as cotangents at ``out.z`` of every counted output position."""
        K, rows = self.n_probes, slice(None)
        if p is not None:  # kl
            pA = out.apply(p)  # W_U p per token, shared by the K probes
            y = sample_categorical(p, K, generator=ctx.generator)  # [n, K], y ~ Categorical(p)
            for k in range(K):
                yield 1.0 / K, rows, out.rows(y[:, k], work) - pA  # (e_y − p) A
        else:  # mse: Rademacher u (E[u uᵀ] = I), drawn in place in the working dtype, then u A
            for _ in range(K):
                u = torch.empty(n, out.d_vocab, dtype=work, device=out.z.device)
                yield 1.0 / K, rows, out.apply(u.bernoulli_(0.5, generator=ctx.generator).mul_(2).sub_(1))

    def _exact_columns(
        self, out: _OutputMap, p: Float[torch.Tensor, "n vocab"] | None, positions: Int[torch.Tensor, "n 2"],
        work: torch.dtype,
    ) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
        """For every output position s and column c of L_s: the cotangent L_s[:, c] A at position s of every
        sequence (weight 1). kl: L_s[:, c] = √p_c (e_c − p); mse (``p is None``): e_c."""
        pA = None if p is None else out.apply(p)
        vocab = torch.arange(out.d_vocab, device=positions.device)
        for s in positions[:, 1].unique().tolist():
            rows = (positions[:, 1] == s).nonzero().squeeze(1)
            for c in range(out.d_vocab):
                e_c = out.rows(vocab[c:c + 1], work)  # [1, D]
                if p is None:
                    yield 1.0, rows, e_c.expand(rows.numel(), -1)
                else:
                    yield 1.0, rows, p[rows, c:c + 1].sqrt() * (e_c - pA[rows])

    def _backward(self, state: _BatchState, z: torch.Tensor, cotangent: torch.Tensor) -> dict[str, torch.Tensor]:
        """One backward pass of ``cotangent`` from ``z``; returns ∂⟨cotangent, z⟩/∂(activation) per site."""
        state.grads = {}
        (leaf_grad,) = torch.autograd.grad(z, state.leaf, cotangent, retain_graph=True)
        grads: dict[str, torch.Tensor] = {}
        for site, names in self.gradient_hooks.items():
            g = state.grads.get(site)
            if self.leaf in names:
                g = leaf_grad if g is None else g + leaf_grad
            if g is None:
                raise RuntimeError(
                    f"no gradient reached site '{site}' in the backward pass from the logits; "
                    "is the hook on the path from the model's input to its output?"
                )
            grads[site] = g
        return grads
