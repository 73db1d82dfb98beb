"""Memory planning for :func:`~tl_degeneracy.collect.collect` (GPT-2 small through XL on one device).

Before a run we estimate, from the model's config alone, the bytes held by

- the *accumulators*: float64 totals for every statistic plus the float32 per-batch increments that wait
  for the end-of-batch NaN check, per *unit* (one site's activation and Jacobian sums, one layer's head-sync
  or neuron-sync sums);
- the *working set* of one batch: the activations the forward (and, with a Jacobian, the autograd graph the
  backward needs) keeps alive, and the logits with their softmax and probe.

What the plan leaves out because the passes do not allocate it (issue 13): no per-batch object outlives its
batch (the engine clears every hook's state in a ``finally`` and drops a batch's increments before the next
batch starts); the float64 totals are added in place (``Stats.add_``: no float64 copy of a float32 increment);
the NaN/inf checks reduce to a sum (no boolean copy of the logits). The model's weights are reported
(:attr:`MemoryPlan.weight_bytes`, :meth:`MemoryPlan.total_bytes`) but do not compete for the budget, which is
the free memory once they are loaded; ``BUDGET_FRACTION`` leaves room for allocator slack and library
workspaces. Measured against the plan: ``benchmarks/bench_memory.py``.

If the sum does not fit the budget (the device's free memory, or ``memory_budget=`` bytes), the units are
split into groups, one pass over the data each (every pass draws the same probes, so the totals equal a
single pass), and if one unit plus the working set still does not fit, the batch is halved. The plan says
what it did.

Example::

    plan = tld.plan_memory(model, sites, batch_size=16, seq_len=128, jacobian="kl", budget_bytes=40e9)
    print(plan.describe())
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tl_degeneracy.adapter import as_adapter
from tl_degeneracy.errors import BadInputError
from tl_degeneracy.sites import site_dim, site_layer

F64, F32 = 8, 4
# Activations the autograd graph keeps per token and per layer, in units of d_model, d_mlp and
# n_heads * T (attention scores and pattern): LayerNorm inputs/outputs, q, k, v, z, attention output,
# residual adds, and the MLP pre-activation, activation-function intermediates and output.
_GRAPH_PER_LAYER = {"d_model": 14, "d_mlp": 4, "attn": 3}
# Logits, their log-softmax/softmax and one probe-sized gradient, per token in units of d_vocab.
_LOGIT_COPIES = 4
#: fraction of the budget the plan may use (allocator fragmentation, library workspaces)
BUDGET_FRACTION = 0.85


@dataclass
class Unit:
    """One indivisible set of accumulators: a site (``site`` set) or one layer's sync sums (``layer``)."""

    name: str
    bytes: int
    site: str | None = None
    head_layer: int | None = None
    neuron_layer: int | None = None


@dataclass
class MemoryPlan:
    """Groups of units (one pass each), the batch size, and the byte counts behind the decision."""

    passes: list[list[Unit]]
    batch_size: int
    requested_batch_size: int
    working_bytes: int
    accumulator_bytes: int
    budget_bytes: int | None
    notes: list[str] = field(default_factory=list)
    #: the model's parameters and buffers (resident before the run; not part of what the budget must hold,
    #: since the device's free memory already excludes them, but part of the peak)
    weight_bytes: int = 0

    @property
    def n_passes(self) -> int:
        return len(self.passes)

    def peak_bytes(self) -> int:
        """Estimated peak the run adds to the resident weights: the working set plus the largest pass's
        accumulators (what must fit the budget, the device's free memory once the model is loaded)."""
        return self.working_bytes + max(sum(u.bytes for u in group) for group in self.passes)

    def total_bytes(self) -> int:
        """Estimated peak of the whole device (or process, less the interpreter): weights + :meth:`peak_bytes`."""
        return self.weight_bytes + self.peak_bytes()

    def describe(self) -> str:
        gib = 1024**3
        budget = "none" if self.budget_bytes is None else f"{self.budget_bytes / gib:.2f} GiB"
        lines = [
            f"memory plan: {self.n_passes} pass(es), batch size {self.batch_size} "
            f"(requested {self.requested_batch_size}), budget {budget}",
            f"  weights {self.weight_bytes / gib:.3f} GiB; accumulators {self.accumulator_bytes / gib:.3f} GiB in "
            "all; working set "
            f"{self.working_bytes / gib:.3f} GiB per batch; estimated peak {self.peak_bytes() / gib:.3f} GiB "
            f"({self.total_bytes() / gib:.3f} GiB with the weights)",
        ]
        lines += [f"  pass {i}: {len(g)} units, {sum(u.bytes for u in g) / gib:.3f} GiB" for i, g in
                  enumerate(self.passes)]
        return "\n".join(lines + [f"  note: {n}" for n in self.notes])

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_passes": self.n_passes, "batch_size": self.batch_size,
            "requested_batch_size": self.requested_batch_size, "working_bytes": self.working_bytes,
            "accumulator_bytes": self.accumulator_bytes, "budget_bytes": self.budget_bytes,
            "weight_bytes": self.weight_bytes, "peak_bytes": self.peak_bytes(), "total_bytes": self.total_bytes(),
            "notes": list(self.notes),
            "passes": [[u.name for u in g] for g in self.passes],
        }


def weight_bytes(model: Any) -> int:
    """Bytes of the model's parameters and buffers (distinct storages, so tied weights count once).

    For a :class:`~tl_degeneracy.adapter.ModelShape` (no weights loaded) the float32 count of a GPT-2-style
    model with an untied unembedding: embeddings, per layer 4 d² + 2 d·d_mlp weights with biases and two
    LayerNorms, the final LayerNorm and W_U.
    """
    module = getattr(model, "model", model)
    if isinstance(module, torch.nn.Module):
        storages: dict[int, int] = {}
        for t in [*module.parameters(), *module.buffers()]:
            st = t.untyped_storage()
            storages[st.data_ptr()] = max(storages.get(st.data_ptr(), 0), st.nbytes())
        return sum(storages.values())
    a = as_adapter(model)
    d, m, V = a.d_model, a.d_mlp or 0, a.d_vocab
    per_layer = 4 * d * d + 4 * d + 2 * d * m + m + d + 4 * d
    return F32 * (V * d + a.n_ctx * d + a.n_layers * per_layer + 2 * d + d * V + V)


def site_totals_bytes(d: int, *, jacobian: bool) -> int:
    """float64/int64 totals of a site: n, Σa, Σaaᵀ, and with a Jacobian its count and Σggᵀ."""
    return F64 * (d * d + d + 1) + (F64 * (d * d + 1) if jacobian else 0)


def site_unit_bytes(d: int, *, jacobian: bool) -> int:
    """A site's totals plus the float32 per-batch increments that wait for the end-of-batch check."""
    return site_totals_bytes(d, jacobian=jacobian) + F32 * (d * d + d) * (2 if jacobian else 1)


def head_sync_bytes(n_heads: int, d_head: int) -> int:
    """Per layer (tl_degeneracy.sync): float64 totals of the pattern Gram and value errors [H, H], the value
    norms [H], the value Gram [(H·d_head)²] and two counts, plus the per-batch increments."""
    hd = n_heads * d_head
    totals = F64 * (2 * n_heads * n_heads + n_heads + hd * hd + 2)
    return totals + F64 * (2 * n_heads * n_heads + n_heads) + F32 * hd * hd


def neuron_sync_bytes(d_mlp: int) -> int:
    """Per layer (tl_degeneracy.sync): float64 totals of the mixing-error cross products and the
    pre-activation Gram (d_mlp² each), Σf² and a count, plus the float32 per-batch increments."""
    return F64 * (2 * d_mlp * d_mlp + d_mlp + 1) + F32 * 2 * d_mlp * d_mlp + F64 * d_mlp


def working_set_bytes(model: Any, *, batch_size: int, seq_len: int, first_layer: int, jacobian: bool,
                      precision: str = "accurate") -> int:
    """Bytes one batch keeps alive: per-layer graph activations (Jacobian) or one layer (forward only), logits."""
    a = as_adapter(model)
    n = batch_size * seq_len
    elt = 2 if precision == "fast" else F32
    per_layer = n * (_GRAPH_PER_LAYER["d_model"] * a.d_model + _GRAPH_PER_LAYER["d_mlp"] * (a.d_mlp or 0)
                     + _GRAPH_PER_LAYER["attn"] * a.n_heads * seq_len) * elt
    if not jacobian:
        return 2 * per_layer  # a layer's activations and its input; nothing after the last site runs
    layers = a.n_layers - first_layer
    logits = _LOGIT_COPIES * n * a.d_vocab * F32
    return per_layer * layers + logits


def available_bytes(device: torch.device) -> int:
    """Free memory of ``device`` (CUDA: ``mem_get_info``; CPU: the kernel's MemAvailable, which counts
    reclaimable page cache, falling back to free physical pages)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def plan_memory(
    model: Any,
    sites: Sequence[str],
    *,
    batch_size: int,
    seq_len: int,
    jacobian: bool = False,
    head_sync_layers: Sequence[int] = (),
    neuron_sync_layers: Sequence[int] = (),
    precision: str = "accurate",
    budget_bytes: float | None = None,
) -> MemoryPlan:
    """Split the accumulators into passes (and shrink the batch) so that each pass fits ``budget_bytes``.

    ``budget_bytes=None`` plans a single pass (no limit). The batch is halved only while one batch's working
    set plus the largest unit does not fit (a smaller batch wastes the device; an extra pass costs a
    forward). Units are then packed largest first into as few passes as fit (first-fit decreasing).
    Raises :class:`BadInputError` if even a single unit with a one-row batch cannot fit, naming the sizes.
    """
    a = as_adapter(model)
    units = [Unit(s, site_unit_bytes(site_dim(a, s), jacobian=jacobian), site=s) for s in sites]
    units += [Unit(f"head_sync/{lay}", head_sync_bytes(a.n_heads, a.d_head), head_layer=lay)
              for lay in head_sync_layers]
    if neuron_sync_layers and a.d_mlp is None:
        raise BadInputError("neuron synchronisation needs an MLP, but this model has none (cfg.d_mlp is None)")
    units += [Unit(f"neuron_sync/{lay}", neuron_sync_bytes(a.d_mlp or 0), neuron_layer=lay)
              for lay in neuron_sync_layers]
    site_layers = [a.n_layers - 1 if site_layer(s) is None else site_layer(s) for s in sites]
    first = min([*site_layers, *head_sync_layers, *neuron_sync_layers], default=0)
    total = sum(u.bytes for u in units)

    def working(bs: int) -> int:
        return working_set_bytes(a, batch_size=bs, seq_len=seq_len, first_layer=first, jacobian=jacobian,
                                 precision=precision)

    if budget_bytes is None:
        return MemoryPlan([units], batch_size, batch_size, working(batch_size), total, None,
                          weight_bytes=weight_bytes(model))
    budget = int(budget_bytes * BUDGET_FRACTION)
    notes: list[str] = []
    bs = batch_size
    largest = max((u.bytes for u in units), default=0)
    while bs > 1 and working(bs) + largest > budget:
        bs = max(1, bs // 2)
    if bs != batch_size:
        notes.append(f"batch size lowered from {batch_size} to {bs} so that one batch's activations fit")
    room = budget - working(bs)
    if room < largest:
        gib = 1024**3
        raise BadInputError(
            f"even one batch row ({working(bs) / gib:.2f} GiB) plus the largest accumulator "
            f"({largest / gib:.2f} GiB) exceeds the memory budget ({budget / gib:.2f} GiB usable); "
            "use fewer sites per call, a shorter seq_len, or a device with more memory"
        )
    passes: list[list[Unit]] = []
    for unit in sorted(units, key=lambda u: -u.bytes):
        for group in passes:
            if sum(u.bytes for u in group) + unit.bytes <= room:
                group.append(unit)
                break
        else:
            passes.append([unit])
    if len(passes) > 1:
        notes.append(f"accumulators ({total / 1024**3:.2f} GiB) split over {len(passes)} passes over the data")
    return MemoryPlan(passes or [[]], bs, batch_size, working(bs), total, int(budget_bytes), notes,
                      weight_bytes=weight_bytes(model))
