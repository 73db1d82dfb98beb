"""Sites and hook names: the one place that spells a TransformerLens hook-name template (SPEC §0).

:data:`SITE_KINDS` are the vector sites we study; :data:`HOOKS` every other hook a pass reads. Names are
built by :func:`hook_name` and parsed by :func:`site_layer` / :func:`site_kind`; :func:`check_layers` is
the one layer-range check.

Example::

    tld.resolve_sites(model, ["resid_pre", "mlp_post"], layers=[0, 1])
    # ['blocks.0.hook_resid_pre', 'blocks.1.hook_resid_pre', 'blocks.0.mlp.hook_post', 'blocks.1.mlp.hook_post']
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tl_degeneracy.adapter import as_adapter
from tl_degeneracy.errors import BadInputError

#: site kind -> hook-name template ({l} is the layer); ``ln_final`` and ``logits`` have no layer. ``logits`` is
#: the unembedding's output (before any soft cap the architecture applies after it): the companion paper's
#: output node layer, the last site of an interaction graph.
SITE_KINDS: dict[str, str] = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "mlp_pre": "blocks.{l}.mlp.hook_pre",
    "mlp_post": "blocks.{l}.mlp.hook_post",
    "attn_z": "blocks.{l}.attn.hook_z",
    "attn_pattern": "blocks.{l}.attn.hook_pattern",
    "ln_final": "ln_final.hook_normalized",
    "logits": "unembed.hook_out",
}

#: hooks read by the collection passes besides the sites ({l} is the layer)
HOOKS: dict[str, str] = {
    **SITE_KINDS,
    "attn_v": "blocks.{l}.attn.hook_v",
    "unembed_in": "unembed.hook_in",
}

_LAYER_RE = re.compile(r"^blocks\.(\d+)\.")


def hook_name(kind: str, layer: int | None = None) -> str:
    """The hook name of a site kind or pass hook (:data:`HOOKS`) at ``layer``.

    Example: ``hook_name("mlp_pre", 3)`` → ``"blocks.3.mlp.hook_pre"``; ``hook_name("ln_final")``.
    """
    template = HOOKS[kind]
    if "{l}" in template:
        if layer is None:
            raise BadInputError(f"hook kind '{kind}' needs a layer")
        return template.format(l=int(layer))
    return template


def check_layers(model: Any, layers: Iterable[int], *, what: str = "layers", sort: bool = True) -> list[int]:
    """Layer indices checked against the model: integers in 0..n_layers−1 (else :class:`BadInputError`).

    Returns them sorted without repeats (``sort=True``) or in the given order.
    Example: ``check_layers(model, [1, 0, 1])`` → ``[0, 1]`` on a model with two or more layers.
    """
    n_layers = as_adapter(model).n_layers
    out = [int(x) for x in layers]
    bad = [x for x in out if not 0 <= x < n_layers]
    if bad:
        raise BadInputError(f"{what} {bad} out of range: the model has layers 0..{n_layers - 1}")
    return sorted(set(out)) if sort else out


def site_layer(name: str) -> int | None:
    """Layer index of a hook name (``None`` for hooks outside the blocks, e.g. ``ln_final``)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def site_kind(name: str) -> str | None:
    """The SPEC site kind of a hook name, or ``None`` for other hooks."""
    for kind, template in SITE_KINDS.items():
        if re.fullmatch(re.escape(template).replace(r"\{l\}", r"\d+"), name):
            return kind
    return None


def site_dim(model: Any, name: str) -> int:
    """Width d of a site's activation vector (``attn_z`` flattens heads: n_heads * d_head; ``logits``:
    d_vocab_out)."""
    adapter = as_adapter(model)
    kind = site_kind(name)
    if kind == "logits":
        return adapter.d_vocab_out
    if kind in ("mlp_pre", "mlp_post"):
        if adapter.d_mlp is None:
            raise BadInputError(f"site '{name}': this model has no MLP (cfg.d_mlp is None)")
        return adapter.d_mlp
    if kind == "attn_z":
        return adapter.n_heads * adapter.d_head
    if kind == "attn_pattern":
        raise BadInputError("attn_pattern is used for head synchronisation only, not as a vector site")
    return adapter.d_model


def resolve_sites(model: Any, kinds: str | Iterable[str], layers: Iterable[int] | None = None) -> list[str]:
    """Hook names for the given site kinds and layers, checked against the model before any computation.

    ``kinds`` are SPEC site kinds (``"resid_pre"``, ``"mlp_post"``, ...) or explicit hook names; ``layers``
    defaults to every layer. Names are grouped by kind, layers ascending. Unknown kinds, out-of-range
    layers and hook names the model lacks fail with the valid choices / close matches.
    """
    adapter = as_adapter(model)
    if isinstance(kinds, str):
        kinds = [k.strip() for k in kinds.split(",") if k.strip()]
    kinds = list(kinds)
    if not kinds:
        raise BadInputError("no site kinds given; choose from " + ", ".join(SITE_KINDS))
    layer_list = list(range(adapter.n_layers)) if layers is None else check_layers(adapter, layers, sort=False)
    names: list[str] = []
    for kind in kinds:
        if kind in SITE_KINDS:
            template = SITE_KINDS[kind]
            new = [template] if "{l}" not in template else [template.format(l=x) for x in layer_list]
        elif "." in kind or kind.startswith("hook_"):
            new = [kind]
        else:
            raise BadInputError(f"unknown site kind '{kind}'; choose from {', '.join(SITE_KINDS)} or a hook name")
        names.extend(n for n in new if n not in names)
    adapter.check_hooks(names)
    return names


@dataclass(frozen=True)
class Site:
    """A vector site: its hook ``name``, SPEC ``kind`` (None for other hooks), ``layer`` (None outside the
    blocks) and activation width ``dim``.

    Example: ``Site.of(model, "blocks.0.mlp.hook_post")`` → ``Site(name=..., kind="mlp_post", layer=0, dim=512)``.
    """

    name: str
    kind: str | None
    layer: int | None
    dim: int

    @classmethod
    def of(cls, model: Any, name: str) -> Site:
        return cls(name, site_kind(name), site_layer(name), site_dim(model, name))
