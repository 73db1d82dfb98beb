"""Pure per-batch kernels of the collection passes: tensors in, increments out (no hooks, no model).

- :func:`gram_increment`: xᵀx of one batch's rows (SPEC §1, §2);
- :func:`head_sync_increments`, :func:`neuron_sync_increments`, :func:`gates`: the synchronisation sums of
  paper §3.2 (eq. 17–22; SPEC §4), documented in :mod:`tl_degeneracy.collection.sync`.

Example::

    x = torch.randn(100, 8)
    gram_increment(x)                     # x.T @ x in float32, to be added to float64 totals
"""

from __future__ import annotations

import math

import torch
from jaxtyping import Bool, Float

from tl_degeneracy.errors import BadInputError

#: gate r_i = f_i / p_i at an exact zero p_i = 0 (eq. 17), the limit φ'(0) of each elementwise activation.
#: ReLU takes 1 (the paper's eq. 17 convention; its left limit would be 0); GELU variants and SiLU take
#: φ'(0) = ½; relu2 (ReLU(x)²) takes 0.
GATE_AT_ZERO: dict[str, float] = {
    "relu": 1.0,
    "gelu": 0.5,
    "gelu_new": 0.5,
    "gelu_fast": 0.5,
    "gelu_pytorch_tanh": 0.5,
    "silu": 0.5,
    "swish": 0.5,
    "relu2": 0.0,
}

def gate_at_zero(act_fn: str | None) -> float:
    """The gate value r(0) used where a preactivation is exactly zero (see :data:`GATE_AT_ZERO`)."""
    if act_fn not in GATE_AT_ZERO:
        raise BadInputError(
            f"neuron synchronisation needs an elementwise activation f = φ(p) with a known gate at p = 0; "
            f"the model's act_fn is {act_fn!r}. Supported: {', '.join(GATE_AT_ZERO)}"
        )
    return GATE_AT_ZERO[act_fn]



#: CPU Grams of at least this width are computed as their upper triangle in column blocks of
#: :data:`TRIANGLE_BLOCK` (54% of the FLOPs at d = 3072), the lower triangle copied from it
TRIANGLE_MIN_D = 1024
TRIANGLE_BLOCK = 256
_TRANSPOSE_TILE = 128


def gram_increment(
    x: Float[torch.Tensor, "n d"], *, fast: bool = False, out: Float[torch.Tensor, "d d"] | None = None
) -> Float[torch.Tensor, "d d"]:
    """xᵀx of one batch's rows with float32 output; callers add it to float64 totals.

    Accurate: float32 inputs and products (TF32 is off during :func:`collect`). Fast: bfloat16 inputs with
    float32 accumulation and output (``torch.mm(..., out_dtype=float32)`` on CUDA; elsewhere the same
    numbers by rounding the inputs to bfloat16 and multiplying in float32). Autocast is off inside, so the
    output is never rounded to bfloat16.

    On the CPU, for d ≥ :data:`TRIANGLE_MIN_D`, only the upper triangle is multiplied (:func:`gram_upper_`;
    the result is exactly symmetric). ``out`` (float32 [d, d], contiguous, on x's device; CPU only) receives
    the result instead of a fresh matrix: a d_mlp² float32 matrix is above the allocator's reuse threshold, so a
    fresh one per batch costs page faults on every batch (:class:`~tl_degeneracy.collection.engine.BatchContext`
    keeps such buffers for the pass).
    """
    with torch.autocast(x.device.type, enabled=False):
        if fast:
            xb = x.to(torch.bfloat16)
            if xb.is_cuda:
                return torch.mm(xb.T, xb, out_dtype=torch.float32)
            x = xb.float()
        else:
            x = x.float()
        d = x.shape[1]
        if x.device.type != "cpu":
            return x.T @ x
        if (out is None or out.shape != (d, d) or out.dtype != torch.float32 or out.device != x.device
                or not out.is_contiguous()):
            out = torch.empty(d, d, dtype=torch.float32)
        if d < TRIANGLE_MIN_D:
            return torch.mm(x.T, x, out=out)
        return gram_upper_(x, out)


def gram_upper_(
    x: Float[torch.Tensor, "n d"], out: Float[torch.Tensor, "d d"], *, block: int | None = None
) -> Float[torch.Tensor, "d d"]:
    """xᵀx into ``out`` from its upper triangle: column block [c0, c1) gets x[:, :c1]ᵀ x[:, c0:c1] (the
    blocks above and on the diagonal), then every block below the diagonal is the transpose of its mirror.
    (1/2 + block/2d) of the full product's FLOPs; the same float32 dot products as ``x.T @ x`` up to the
    order of summation inside each, so equal to it within float32 rounding, and exactly symmetric."""
    d, block = x.shape[1], block or TRIANGLE_BLOCK
    xt = x.T
    for c0 in range(0, d, block):
        c1 = min(c0 + block, d)
        torch.mm(xt[:c1], x[:, c0:c1], out=out[:c1, c0:c1])
    tile = _TRANSPOSE_TILE  # below the diagonal blocks: transposed copies in cache-sized tiles
    for c0 in range(block, d, block):
        c1 = min(c0 + block, d)
        for r0 in range(0, c0, tile):
            r1 = min(r0 + tile, c0)
            for t0 in range(c0, c1, tile):
                t1 = min(t0 + tile, c1)
                out[t0:t1, r0:r1].copy_(out[r0:r1, t0:t1].T)
    for c0 in range(0, d, block):  # the diagonal blocks: their lower triangles from their upper ones
        diag = out[c0:c0 + block, c0:c0 + block]
        diag.copy_(diag.triu() + diag.triu(1).T)
    return out


def softmax_rows_(x: Float[torch.Tensor, "n vocab"]) -> Float[torch.Tensor, "n vocab"]:
    """softmax over the last dimension, in place (no second [n, V] matrix): exp(x − max) / Σ exp(x − max).
    Equal to ``torch.softmax`` within float32 rounding; returns ``x``."""
    x.sub_(x.amax(dim=-1, keepdim=True)).exp_()
    return x.div_(x.sum(dim=-1, keepdim=True))


#: rows per float64 block-sum chunk in :func:`sample_categorical`
_SUM_ROWS = 8


def sample_categorical(
    p: Float[torch.Tensor, "n vocab"], n_samples: int, *, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``n_samples`` independent draws y ~ Categorical(p[i] / Σp[i]) per row, as int64 [n, n_samples].

    The same distribution as ``torch.multinomial(p, n_samples, replacement=True)`` at a fraction of its cost on
    a [tokens, 50k] matrix, by a two-stage inverse-CDF draw: the vocabulary is cut into ⌈√V⌉-wide blocks;
    a block b is drawn with probability (mass of b) / Σp from the float64 CDF of the block masses, then an entry
    of b with probability p_j / (mass of b) from the float64 CDF of the block's entries, so
    P(y = j) = p_j / Σp (up to float64 rounding of the CDFs). One read of ``p`` (the block sums) plus
    n·n_samples·√V gathered entries, no [n, V] temporary. Entries with p_j = 0 are never drawn (a search for
    the first CDF value above u skips empty entries and blocks). Rows must be non-negative with a positive
    sum (as softmax outputs are). Draws are a function of ``generator``'s state (two ``torch.rand`` calls).
    """
    n, V = p.shape
    width = max(1, math.isqrt(V - 1) + 1) if V > 1 else 1
    full = V // width
    n_blocks = full + (full * width < V)
    block_cdf = torch.empty(n, n_blocks, dtype=torch.float64, device=p.device)
    # block masses in float64, over a few rows at a time: a float64 sum of float32 entries casts its input
    # first, and a cast of all of p would be an [n, V] float64 temporary (page faults; 4x slower on the CPU)
    for i in range(0, n, _SUM_ROWS):
        rows = p[i:i + _SUM_ROWS]
        if full:
            blocks = rows[:, : full * width].unflatten(1, (full, width))
            torch.sum(blocks, -1, dtype=torch.float64, out=block_cdf[i:i + _SUM_ROWS, :full])
        if full < n_blocks:
            torch.sum(rows[:, full * width:], -1, keepdim=True, dtype=torch.float64,
                      out=block_cdf[i:i + _SUM_ROWS, full:])
    block_cdf.cumsum_(1)  # [n, n_blocks]
    u = torch.rand(n, 2 * n_samples, dtype=torch.float64, device=p.device, generator=generator)
    u1, u2 = u[:, :n_samples], u[:, n_samples:]
    block = torch.searchsorted(block_cdf, u1 * block_cdf[:, -1:], right=True).clamp_(max=n_blocks - 1)
    # entries of the chosen blocks [n, n_samples, width]; columns past V (last, partial block) read as 0
    cols = block.unsqueeze(-1) * width + torch.arange(width, device=p.device)
    inside = cols < V
    vals = p.gather(1, cols.clamp(max=V - 1).reshape(n, -1)).reshape(n, n_samples, width)
    entry_cdf = torch.where(inside, vals, 0).to(torch.float64).cumsum_(-1)
    j = torch.searchsorted(entry_cdf, (u2 * entry_cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    return (block * width + j.clamp_(max=width - 1)).clamp_(max=V - 1)


def head_sync_increments(
    pattern: Float[torch.Tensor, "batch head q k"],
    v: Float[torch.Tensor, "batch k kv_head d_head"],
    mask: Bool[torch.Tensor, "batch q"],
) -> dict[str, torch.Tensor]:
    """One batch's head-synchronisation sums over counted query tokens (SPEC §4).

    With a = A_h[q, :] and V_h [k, d_head] the head's value vectors in the same sequence:

    - ``pattern_gram`` [h, h'] = Σ_q ⟨A_h[q], A_h'[q]⟩ (float64), so Σ‖A_h − A_h'‖² = G_hh + G_h'h' − 2 G_hh';
    - ``value_err`` [h, h'] = Σ_q ‖(A_h[q] − A_h'[q]) V_h‖², the output error of moving head h's values into
      head h' (directed; squares of the differences summed in float32, so synchronised heads give zeros
      rather than a cancellation of large terms);
    - ``value_sq`` [h] = Σ_q ‖A_h[q] V_h‖²;
    - ``value_outer`` = Σ_k v_k v_kᵀ over attended keys, v_k = concat_h V_h[k] (H·d_head), and ``n_keys``.

    Grouped-query models (fewer value heads than heads) have their value heads repeated to one per head.
    """
    b, n_heads, t_q, t_k = pattern.shape
    vals = v.float()
    if vals.shape[2] != n_heads:
        vals = vals.repeat_interleave(n_heads // vals.shape[2], dim=2)
    d_head = vals.shape[-1]
    mask = mask.to(pattern.device)
    # zero the rows of uncounted queries: they then add nothing to any sum below (no gathers needed)
    a = pattern.float() * mask[:, None, :, None]
    flat = a.double().transpose(0, 1).reshape(n_heads, -1)
    pattern_gram = flat @ flat.T
    # Z[b, g, q, h] = A_g[q] V_h: head g's pattern applied to head h's values, one batched product
    z = torch.matmul(a.reshape(b, n_heads * t_q, t_k), vals.reshape(b, t_k, n_heads * d_head))
    z = z.view(b, n_heads, t_q, n_heads, d_head)
    own = z.diagonal(dim1=1, dim2=3).permute(0, 3, 1, 2).contiguous()  # [B, h, q, d] = A_h V_h, own output
    err = (z - own.permute(0, 2, 1, 3).unsqueeze(1)).square_().sum(dim=(0, 2, 4))  # [g, h]
    attended = a.amax(dim=(1, 2)) > 0  # [B, Tk]: keys some counted query attends to
    keys = vals[attended].reshape(-1, n_heads * d_head)
    return {
        "n": mask.sum().to(torch.int64),
        "pattern_gram": pattern_gram,
        "value_err": err.T.double(),
        "value_sq": own.square().sum(dim=(0, 2, 3)).double(),
        "value_outer": gram_increment(keys),
        "n_keys": torch.tensor(keys.shape[0], dtype=torch.int64, device=a.device),
    }


def gates(
    pre: Float[torch.Tensor, "n d_mlp"], post: Float[torch.Tensor, "n d_mlp"], at_zero: float
) -> Float[torch.Tensor, "n d_mlp"]:
    """r = f / p elementwise (eq. 17), ``at_zero`` where p = 0 exactly (never NaN)."""
    nonzero = pre != 0
    return torch.where(nonzero, post / torch.where(nonzero, pre, torch.ones_like(pre)), at_zero)


def neuron_sync_increments(
    pre: Float[torch.Tensor, "batch pos d_mlp"],
    post: Float[torch.Tensor, "batch pos d_mlp"],
    mask: Bool[torch.Tensor, "batch pos"],
    at_zero: float,
    *,
    binary_gates: bool = False,
    out: dict[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """One batch's neuron-synchronisation sums over counted tokens (eq. 17, 20; SPEC §4).

    The directed mixing error expands as ((r_j − r_i) p_i)² = p_i² r_j² − 2 f_i p_i r_j + f_i² (f_i = r_i p_i),
    so with P2 = p², R = r, R2 = r², F = f over the batch's tokens [n, d_mlp]:

        n · E[i→j] = (P2ᵀ R2 − 2 (F ∘ P)ᵀ R)[i, j] + Σ_t f_i²

    — two d_mlp×d_mlp products (``cross``) and a vector (``f_sq``); plus the preactivation Gram
    ``pre_outer`` = Pᵀ P for the block ranks s_a (eq. 21). ``binary_gates=True`` (ReLU: r ∈ {0, 1}, so
    r² = r) needs one product for ``cross`` instead of two. ``out`` may hold float32 [d_mlp, d_mlp] CPU buffers
    ``"cross"`` and ``"pre_outer"`` for the results (reused batch after batch; see :func:`gram_increment`).
    """
    mask = mask.to(pre.device)
    p = pre[mask].float()
    f = post[mask].float()
    r = gates(p, f, at_zero)
    out = out or {}
    d = p.shape[1]
    cross = out.get("cross")
    if (cross is None or cross.shape != (d, d) or cross.dtype != torch.float32 or cross.device != p.device
            or not cross.is_contiguous()):
        cross = torch.empty(d, d, dtype=torch.float32, device=p.device)
    if binary_gates:  # r ∈ {0, 1} so r² = r: one product, P2ᵀR2 − 2(F∘P)ᵀR = (P2 ∘ (1 − 2R))ᵀ R
        torch.mm((p * p * (1.0 - 2.0 * r)).T, r, out=cross)
    else:
        torch.mm((p * p).T, r * r, out=cross)
        cross.addmm_((f * p).T, r, alpha=-2.0)
    return {
        "n": torch.tensor(p.shape[0], dtype=torch.int64, device=p.device),
        "cross": cross,
        "f_sq": f.double().square().sum(0),
        "pre_outer": gram_increment(p, out=out.get("pre_outer")),
    }

