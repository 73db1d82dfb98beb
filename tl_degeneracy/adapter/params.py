"""Parameters of a model as TransformerLens names them: selections, masks and a functional view (SPEC §5).

Example::

    masks = parameter_masks(model, "blocks.1.attn.h2")   # which entries of which parameters head 2 owns
    fm = FunctionalModel(model); logits = fm(fm.parameters, tokens)
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import torch
from jaxtyping import Float, Int

from tl_degeneracy.adapter.model import ModelAdapter, _is_bridge, as_adapter, preserved_state
from tl_degeneracy.errors import BadInputError

_HEAD_PARAMS = ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V")


def _head_selection(sel: str) -> tuple[int, int] | None:
    """(layer, head) of a selection ``"blocks.{l}.attn.h{h}"``, else None."""
    parts = sel.split(".")
    if len(parts) == 4 and parts[0] == "blocks" and parts[2] == "attn" and parts[3][:1] == "h":
        if parts[1].isdigit() and parts[3][1:].isdigit():
            return int(parts[1]), int(parts[3][1:])
    return None


class FunctionalModel:
    """The model as a pure function of its parameters: ``fm(values, tokens) -> logits``.

    ``parameters`` holds every distinct parameter once, under a module path that
    ``torch.func.functional_call`` accepts. A parameter reachable under several paths (4.x bridges alias
    every wrapped module, HF models may tie embeddings) is swapped at each distinct (module, attribute)
    exactly once: handing ``functional_call`` two paths to one attribute makes it restore the wrong
    tensor, and under ``vmap`` a batched tensor would be left inside the model.

    Works under ``torch.func.vmap``/``grad``; the model's own parameters are never written.
    """

    def __init__(self, model: Any):
        if isinstance(model, ModelAdapter):
            model = model.model
        self.model = model
        by_param: dict[int, tuple[torch.nn.Parameter, list[str]]] = {}
        for prefix, module in torch.nn.Module.named_modules(model):  # the base method: real module paths
            for attr, p in module._parameters.items():
                if p is not None:
                    by_param.setdefault(id(p), (p, []))[1].append(f"{prefix}.{attr}" if prefix else attr)
        self.parameters: dict[str, torch.nn.Parameter] = {paths[0]: p for p, paths in by_param.values()}
        self.paths: dict[str, tuple[str, ...]] = {paths[0]: tuple(paths) for _, paths in by_param.values()}

    def __call__(
        self, values: dict[str, torch.Tensor], tokens: Int[torch.Tensor, "batch pos"]
    ) -> Float[torch.Tensor, "batch pos vocab"]:
        """Logits of the model with parameters ``values`` (canonical name -> tensor; missing ones as they are)."""
        swapped = {path: v for name, v in values.items() for path in self.paths[name]}
        return torch.func.functional_call(self.model, swapped, (tokens,), tie_weights=False, strict=False)


def _tl_parameters(model: Any) -> dict[str, torch.Tensor]:
    """TransformerLens-style parameters (``blocks.0.attn.W_Q`` [n_heads, d_model, d_head], ...), computed
    differentiably from the model's own parameters (4.x builds them from the HF weights on demand)."""
    if not _is_bridge(model):
        return dict(model.named_parameters())
    try:
        return dict(model.tl_named_parameters())
    except Exception as err:  # noqa: BLE001 - architectures the bridge cannot express in TL names
        raise BadInputError(
            f"this {type(model).__name__} cannot list TransformerLens-style parameters "
            f"({type(err).__name__}: {str(err)[:200]}); select params='all' or pass masks directly"
        ) from err


def parameter_selections(model: Any) -> list[str]:
    """Every selection :func:`parameter_masks` accepts for this model (besides lists of them)."""
    a = as_adapter(model)
    tl_names = list(_tl_parameters(a.model))
    prefixes = {".".join(n.split(".")[: (3 if n.startswith("blocks.") else 1)]) for n in tl_names}
    prefixes |= {f"blocks.{layer}" for layer in range(a.n_layers)}
    heads = [f"blocks.{layer}.attn.h{h}" for layer in range(a.n_layers) for h in range(a.n_heads)]
    return ["all", *sorted(prefixes, key=_natural_key), *heads]


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def parameter_masks(model: Any, selection: str | Sequence[str]) -> dict[str, torch.Tensor]:
    """Boolean masks over the model's parameters that pick a TransformerLens-named part of it (SPEC §5).

    Selections: ``"all"``, ``"embed"``, ``"pos_embed"``, ``"unembed"``, ``"ln_final"``, ``"blocks.{l}"``,
    ``"blocks.{l}.attn"``, ``"blocks.{l}.mlp"``, ``"blocks.{l}.ln1"``, any single TransformerLens parameter
    (``"blocks.{l}.attn.W_Q"``), ``"blocks.{l}.attn.h{h}"`` (head h's slices of W_Q, W_K, W_V, W_O, b_Q,
    b_K, b_V; with grouped key/value heads the K/V group h belongs to), or a list of these (union).

    Returns ``{name: bool mask}`` keyed like :class:`FunctionalModel` ``.parameters``, for the parameters
    with at least one selected entry. The mapping is read off the model itself: the selected
    TransformerLens tensors are summed with random positive weights and differentiated with respect to
    the model's own parameters, so an entry is selected exactly when a selected TL entry depends on it
    (a slice of a 4.x q/k/v Linear, a column block of a fused c_attn, or the 3.x tensor itself).
    Raises :class:`BadInputError` naming the valid selections for an unknown one.

    Example::

        masks = parameter_masks(model, "blocks.1.attn.h2")   # rows 16:24 of q/k/v, columns 16:24 of o, ...
    """
    adapter = as_adapter(model)
    fm = FunctionalModel(adapter.model)
    selections = [selection] if isinstance(selection, str) else list(selection)
    if not selections:
        raise BadInputError("the parameter selection is empty")
    if "all" in selections and not adapter.is_bridge:
        return {name: torch.ones_like(p, dtype=torch.bool) for name, p in fm.parameters.items()}

    with preserved_state(adapter.model), torch.enable_grad():
        for p in fm.parameters.values():
            p.requires_grad_(True)
        tl = _tl_parameters(adapter.model)
        pieces: list[torch.Tensor] = []
        for sel in selections:
            # "all" on a 4.x bridge: every TransformerLens parameter, which leaves out parameters the
            # forward never reads (HF GPT-2's fused c_attn sits beside the split q/k/v views it feeds)
            pieces.extend([t for t in tl.values() if t.requires_grad] if sel == "all"
                          else _selected_pieces(adapter, tl, sel))
        gen = torch.Generator().manual_seed(0)
        total = sum(
            (t * (0.5 + torch.rand(t.shape, generator=gen)).to(t.device, t.dtype)).sum() for t in pieces
        )
        grads = torch.autograd.grad(total, list(fm.parameters.values()), allow_unused=True)
    masks = {name: g != 0 for name, g in zip(fm.parameters, grads, strict=True) if g is not None}
    masks = {name: m for name, m in masks.items() if bool(m.any())}
    if not masks:
        raise BadInputError(f"selection {selection!r} picks no trainable parameter of this model")
    return masks


def _selected_pieces(adapter: ModelAdapter, tl: dict[str, torch.Tensor], sel: str) -> list[torch.Tensor]:
    """The TL tensors (or head slices of them) that one selection names, each connected to the graph."""
    head = _head_selection(sel)
    if head is not None:
        layer, h = head
        if layer >= adapter.n_layers or h >= adapter.n_heads:
            raise BadInputError(
                f"'{sel}': the model has layers 0..{adapter.n_layers - 1} and heads 0..{adapter.n_heads - 1}"
            )
        out = []
        for pname in _HEAD_PARAMS:
            t = tl.get(f"blocks.{layer}.attn.{pname}")
            if t is None or not t.requires_grad:
                continue
            group = adapter.n_heads // t.shape[0] if t.shape[0] < adapter.n_heads else 1  # grouped K/V heads
            out.append(t[h // group])
        if not out:
            raise BadInputError(f"'{sel}': this model exposes no per-head attention parameters")
        return out
    matched = [t for name, t in tl.items() if (name == sel or name.startswith(sel + ".")) and t.requires_grad]
    if matched:
        return matched
    valid = parameter_selections(adapter.model)
    close = difflib.get_close_matches(sel, valid, n=4, cutoff=0.6)
    shown = ", ".join(valid[:12]) + (", ..." if len(valid) > 12 else "")
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise BadInputError(f"unknown parameter selection '{sel}'.{hint} Valid selections: {shown}")
