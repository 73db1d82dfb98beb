"""The model adapter: the one place that knows TransformerLens 3.x from 4.x.

TransformerLens 4.x gives a ``TransformerBridge`` (legacy hook names are aliases, parameters keep their
HuggingFace names); 3.x gives a ``HookedTransformer`` (legacy hook names are native). Both expose
``hooks()``, ``cfg``, ``to_tokens`` and a forward that maps tokens [B, T] to logits [B, T, V]. Every other
module talks to a model through :class:`ModelAdapter` and never imports a version-specific name.

Example::

    model = tld.load_model(tld.bundled_model_path())      # a local save_pretrained folder, offline
    adapter = tld.ModelAdapter(model)
    adapter.has_hook("blocks.0.hook_resid_pre")          # True on both majors
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.metadata
import importlib.resources
import json
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch
from jaxtyping import Float, Int

from tl_degeneracy._io import tensors_checksum
from tl_degeneracy.errors import BadInputError, UnknownHookError

# Hooks that exist but raise (4.x) or never fire (3.x) until a cfg flag is switched on.
_GATED_HOOKS = {
    "attn.hook_result": ("use_attn_result", "model.set_use_attn_result(True)"),
    "hook_mlp_in": ("use_hook_mlp_in", "model.set_use_hook_mlp_in(True)"),
    "attn.hook_attn_in": ("use_attn_in", "model.set_use_attn_in(True)"),
    "hook_q_input": ("use_split_qkv_input", "model.set_use_split_qkv_input(True)"),
    "hook_k_input": ("use_split_qkv_input", "model.set_use_split_qkv_input(True)"),
    "hook_v_input": ("use_split_qkv_input", "model.set_use_split_qkv_input(True)"),
}

# Legacy (HookedTransformer-style) hook names, per layer and global; used for listing close matches.
_LEGACY_BLOCK_HOOKS = (
    "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
    "mlp.hook_pre", "mlp.hook_post", "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_z",
    "attn.hook_pattern", "attn.hook_attn_scores", "ln1.hook_normalized", "ln1.hook_scale",
    "ln2.hook_normalized", "ln2.hook_scale",
)
_LEGACY_GLOBAL_HOOKS = (
    "hook_embed", "hook_pos_embed", "ln_final.hook_normalized", "ln_final.hook_scale", "hook_unembed",
)


def transformer_lens_version() -> str:
    """The installed TransformerLens version string, e.g. ``"4.3.0"``."""
    return importlib.metadata.version("transformer-lens")


def _is_bridge(model: Any) -> bool:
    return type(model).__module__.startswith("transformer_lens.model_bridge")


class ModelAdapter:
    """A TransformerLens model (4.x ``TransformerBridge`` or 3.x ``HookedTransformer``) seen one way.

    Attributes mirror the ``cfg`` fields the library uses: ``n_layers``, ``d_model``, ``d_mlp``,
    ``n_heads``, ``d_head``, ``d_vocab``, ``n_ctx``, ``act_fn``.
    """

    def __init__(self, model: Any):
        if isinstance(model, ModelAdapter):
            model = model.model
        if not (hasattr(model, "hooks") and hasattr(model, "cfg")):
            raise BadInputError(
                f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got "
                f"{type(model).__name__}; load one with tld.load_model(name_or_path)"
            )
        self.model = model
        self.is_bridge = _is_bridge(model)
        cfg = model.cfg
        self.n_layers: int = int(cfg.n_layers)
        self.d_model: int = int(cfg.d_model)
        self.d_mlp: int | None = None if cfg.d_mlp is None else int(cfg.d_mlp)
        self.n_heads: int = int(cfg.n_heads)
        self.d_head: int = int(cfg.d_head)
        self.d_vocab: int = int(cfg.d_vocab)
        out = getattr(cfg, "d_vocab_out", -1)  # TransformerLens: −1 means d_vocab
        self.d_vocab_out: int = self.d_vocab if out is None or int(out) <= 0 else int(out)
        self.n_ctx: int = int(cfg.n_ctx)
        self.act_fn: str | None = getattr(cfg, "act_fn", None)

    # ---- identity -------------------------------------------------------------------------------
    @property
    def tokenizer(self) -> Any:
        return getattr(self.model, "tokenizer", None)

    @property
    def bos_token_id(self) -> int | None:
        tok = self.tokenizer
        return None if tok is None or tok.bos_token_id is None else int(tok.bos_token_id)

    @property
    def compatibility_mode(self) -> bool:
        """4.x: whether ``enable_compatibility_mode()`` folded LayerNorm; 3.x models are always 'compatible'."""
        if self.is_bridge:
            return bool(getattr(self.model, "compatibility_mode", False))
        return True

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return torch.device("cpu") if p is None else p.device

    @property
    def dtype(self) -> torch.dtype:
        p = next(self.model.parameters(), None)
        return torch.float32 if p is None else p.dtype

    @property
    def model_name(self) -> str:
        return str(getattr(self.model.cfg, "model_name", None) or type(self.model).__name__)

    def weights_fingerprint(self) -> str:
        """A hash of the model's weights (every parameter's name, dtype, shape and bytes; ``xxh3_128:<hex>``, see
        :func:`tl_degeneracy._io.tensors_checksum`): the identity of the weights recorded in statistics, so
        statistics of other weights behind the same name or path are never merged or resumed. Cost: one pass
        over the weights' bytes at ~5 GB/s: 0.1 s for GPT-2 small's 0.5 GB on one CPU core, where sha256 took
        1.2 s (benchmarks/bench_fingerprint.py)."""
        return tensors_checksum({name: p for name, p in self.model.named_parameters()}, algorithm="xxh3_128")

    def describe(self) -> dict[str, Any]:
        """JSON-ready description recorded with every result (model identity and the conventions in force)."""
        return {
            "model_name": self.model_name,
            "model_class": type(self.model).__name__,
            "transformer_lens_version": transformer_lens_version(),
            "compatibility_mode": self.compatibility_mode,
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "d_mlp": self.d_mlp,
            "n_heads": self.n_heads,
            "d_head": self.d_head,
            "d_vocab": self.d_vocab,
            "n_ctx": self.n_ctx,
            "act_fn": self.act_fn,
            "dtype": str(self.dtype).removeprefix("torch."),
        }

    # ---- hooks ----------------------------------------------------------------------------------
    def _hook_point(self, name: str) -> Any:
        if self.is_bridge:
            return self.model.get_hook_point(name)
        return self.model.hook_dict.get(name)

    def has_hook(self, name: str) -> bool:
        return self._hook_point(name) is not None

    def hook_names(self) -> list[str]:
        """Every hook name the model answers to (legacy aliases included on 4.x)."""
        names = set(self.model.hook_dict)
        legacy = [f"blocks.{layer}.{h}" for layer in range(self.n_layers) for h in _LEGACY_BLOCK_HOOKS]
        names.update(n for n in (*legacy, *_LEGACY_GLOBAL_HOOKS) if self.has_hook(n))
        return sorted(names)

    def check_hooks(self, names: Sequence[str]) -> None:
        """Raise :class:`UnknownHookError` for the first name the model lacks or has switched off."""
        for name in names:
            if not self.has_hook(name):
                close = difflib.get_close_matches(name, self.hook_names(), n=5, cutoff=0.6)
                hint = f"; close matches: {', '.join(close)}" if close else ""
                raise UnknownHookError(
                    f"the model has no hook named '{name}'{hint}. "
                    f"Layers are 0..{self.n_layers - 1}; see tld.SITE_KINDS for the site kinds."
                )
            for suffix, (flag, call) in _GATED_HOOKS.items():
                if name.endswith(suffix) and not getattr(self.model.cfg, flag, False):
                    raise UnknownHookError(
                        f"hook '{name}' is switched off in this model (cfg.{flag} is False); call {call} first"
                    )

    def hooks(self, fwd_hooks: Sequence = (), bwd_hooks: Sequence = ()) -> contextlib.AbstractContextManager:
        """Exception-safe context that attaches ``(name, fn)`` hooks and removes them on exit."""
        return self.model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks))

    # ---- running --------------------------------------------------------------------------------
    def forward(self, tokens: Int[torch.Tensor, "batch pos"]) -> Float[torch.Tensor, "batch pos vocab"]:
        return self.model(tokens)

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text, without special tokens (no BOS added)."""
        if self.tokenizer is None:
            raise BadInputError(
                "the model has no tokenizer, so text cannot be tokenised; pass token ids (a LongTensor) instead"
            )
        return [list(ids) for ids in self.tokenizer(list(texts), add_special_tokens=False)["input_ids"]]

    @contextlib.contextmanager
    def eval_mode(self) -> Iterator[None]:
        """Switch every module to eval for the duration; restore each module's own mode afterwards."""
        with preserved_state(self.model):
            self.model.eval()
            yield

    @contextlib.contextmanager
    def frozen_parameters(self) -> Iterator[None]:
        """Parameters stop requiring grad (no weight gradients anywhere); flags restored afterwards."""
        with preserved_state(self.model):
            for p in self.model.parameters():
                p.requires_grad_(False)
            yield

    # ---- output-Jacobian support (added for tl_degeneracy.jacobian, issue 3) ---------------------------
    def gradient_hooks(self, name: str) -> list[str]:
        """Hooks whose backward-hook gradients add up to ∂(logits)/∂(the activation at ``name``).

        Usually ``[name]``. On 4.x, ``blocks.{l}.hook_resid_mid`` is an alias of ``blocks.{l}.ln2.hook_in``,
        the input of the second LayerNorm only: the residual skip to ``blocks.{l}.hook_resid_post`` bypasses
        that hook, so its backward hook sees only the MLP path. In a sequential block
        resid_post = resid_mid + MLP(LN2(resid_mid)), so the residual stream's gradient is the sum of the
        gradients at both hooks.
        """
        layer = name.split(".")[1] if name.startswith("blocks.") and name.endswith(".hook_resid_mid") else None
        if not self.is_bridge or layer is None:
            return [name]
        ln2_in = f"blocks.{layer}.ln2.hook_in"
        if not self.has_hook(ln2_in) or self._hook_point(name) is not self._hook_point(ln2_in):
            return [name]
        if getattr(self.model.cfg, "parallel_attn_mlp", False):
            raise BadInputError(
                f"'{name}': this model runs attention and MLP in parallel, so it has no residual stream between "
                "them; use hook_resid_pre or hook_resid_post for Jacobian statistics"
            )
        return [name, f"blocks.{layer}.hook_resid_post"]

    def full_stream_hooks(self, fwd_hooks: Sequence) -> list[tuple[str, Any]]:
        """Forward hooks that *replace* an activation, rewritten so the replacement reaches the whole stream.

        Usually unchanged. On 4.x, ``blocks.{l}.hook_resid_mid`` is an alias of ``blocks.{l}.ln2.hook_in``,
        which feeds only the MLP branch: a replacement there leaves the residual skip to
        ``hook_resid_post`` with the original stream. In a sequential block
        resid_post = resid_mid + MLP(LN2(resid_mid)), so adding the change (ã − a) made at the alias to
        ``hook_resid_post`` gives ã + MLP(LN2(ã)): the full replacement. The wrapped hook sees a hook object
        named as asked (``hook.name == name``). Parallel attention/MLP blocks have no such stream: refused.
        """
        out: list[tuple[str, Any]] = []
        for name, fn in fwd_hooks:
            extra = self.gradient_hooks(name)  # [name] or [resid_mid, resid_post] (same 4.x alias test)
            if len(extra) == 1:
                out.append((name, fn))
                continue
            out.extend(_full_stream_pair(name, extra[1], fn))
        return out

    def unembedding(self) -> Unembedding | None:
        """The final affine map logits = x W_U + b_U and the hook that sees its input x, or ``None``.

        ``None`` when the model transforms the logits further (a soft cap), or has no ``unembed.hook_in``.
        Callers that rely on the map should still check it on their data (an architecture may scale logits
        after the unembedding in code this adapter cannot see).
        """
        cap = getattr(self.model.cfg, "output_logits_soft_cap", None)
        if (cap is not None and cap > 0) or not self.has_hook("unembed.hook_in"):
            return None
        try:
            W_U, b_U = self.model.W_U, self.model.b_U
        except (AttributeError, RuntimeError):
            return None
        return Unembedding("unembed.hook_in", W_U.detach(), b_U.detach())


class _NamedHook:
    """A hook point seen under another name (everything else forwarded)."""

    def __init__(self, hook: Any, name: str):
        self._hook, self.name = hook, name

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._hook, attr)


def _full_stream_pair(name: str, post: str, fn: Any) -> list[tuple[str, Any]]:
    delta: list[torch.Tensor] = []

    def at_alias(act: torch.Tensor, hook: Any) -> torch.Tensor:
        new = fn(act, _NamedHook(hook, name))
        new = act if new is None else new
        delta.clear()
        delta.append(new - act)
        return new

    def at_post(act: torch.Tensor, hook: Any) -> torch.Tensor:
        if not delta:
            return act
        return act + delta.pop()

    return [(name, at_alias), (post, at_post)]


class Unembedding(NamedTuple):
    """``hook`` sees x [batch, pos, d_model]; logits = x @ ``W_U`` [d_model, d_vocab] + ``b_U`` [d_vocab]."""

    hook: str
    W_U: Float[torch.Tensor, "d_model d_vocab"]
    b_U: Float[torch.Tensor, " d_vocab"]


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a model without its weights, for planning (e.g. GPT-2 XL before loading it).

    ``ModelShape.gpt2("xl")`` gives the published GPT-2 sizes; any field can be set by hand.
    """

    n_layers: int
    d_model: int
    d_mlp: int | None
    n_heads: int
    d_head: int
    d_vocab: int
    n_ctx: int
    act_fn: str | None = "gelu_new"

    @classmethod
    def gpt2(cls, size: str = "small") -> ModelShape:
        layers, width, heads = {"small": (12, 768, 12), "medium": (24, 1024, 16), "large": (36, 1280, 20),
                                "xl": (48, 1600, 25)}[size]
        return cls(layers, width, 4 * width, heads, width // heads, 50257, 1024)

    @classmethod
    def of(cls, model: Any) -> ModelShape:
        a = as_adapter(model)
        return cls(a.n_layers, a.d_model, a.d_mlp, a.n_heads, a.d_head, a.d_vocab, a.n_ctx, a.act_fn)


def as_adapter(model: Any) -> ModelAdapter:
    """The adapter of a model (a :class:`ModelShape` passes through: it has the same size attributes)."""
    return model if isinstance(model, (ModelAdapter, ModelShape)) else ModelAdapter(model)


def load_model(
    name_or_path: str | os.PathLike,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Any:
    """Load a TransformerLens model in eval mode: a hub name (needs a network) or a local folder.

    On TransformerLens 4.x this is ``TransformerBridge.boot_transformers`` (a folder written by
    ``save_pretrained`` loads offline). On 3.x a hub name goes through ``HookedTransformer.from_pretrained``
    and a local GPT-2 folder is converted with TransformerLens's own GPT-2 weight conversion.

    A folder holding a TransformerLens state dict (``config.json`` with
    ``"tl_degeneracy_format": "hooked_transformer_state_dict"``), or the name of a bundled one, loads on
    either major through :func:`_load_modadd`: ``load_model("modadd-113")`` is the bundled grokked
    modular-addition transformer (``tl_degeneracy/bundled/modadd-113``, see :func:`tl_degeneracy.modadd_data`).
    """
    state_dict_folder = _tl_state_dict_folder(name_or_path)
    if state_dict_folder is not None:
        return _load_modadd(state_dict_folder, device=device, dtype=dtype)
    path = Path(name_or_path)
    is_local = path.exists()
    if not is_local and (os.sep in str(name_or_path) or str(name_or_path).startswith(".")):
        raise BadInputError(f"model folder '{name_or_path}' does not exist")
    if is_local and not (path / "config.json").exists():
        raise BadInputError(
            f"'{path}' has no config.json: pass a folder written by save_pretrained (model + tokenizer)"
        )
    try:
        if transformer_lens_version().startswith(("0.", "1.", "2.", "3.")):
            model = _load_tl3(str(name_or_path), is_local=is_local, device=device, dtype=dtype)
        else:
            from transformer_lens.model_bridge import TransformerBridge

            model = TransformerBridge.boot_transformers(str(name_or_path), device=device, dtype=dtype)
    except (OSError, ConnectionError) as err:
        if is_local:
            raise
        raise BadInputError(
            f"could not load '{name_or_path}': it is not a local folder, and fetching it from the hub failed "
            f"({type(err).__name__}: {str(err)[:200]}). Offline, pass a folder written by save_pretrained, "
            f"e.g. the bundled model tld.bundled_model_path()"
        ) from err
    model.eval()
    return model


def _load_tl3(name: str, *, is_local: bool, device: Any, dtype: torch.dtype) -> Any:
    from transformer_lens import HookedTransformer

    if not is_local:
        return HookedTransformer.from_pretrained(name, device=str(device), dtype=dtype)
    from transformer_lens import HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoTokenizer, GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(name, torch_dtype=dtype)
    hc = hf.config
    if hc.model_type != "gpt2":
        raise BadInputError(
            f"offline loading of a local folder on TransformerLens 3.x supports GPT-2 models, got "
            f"'{hc.model_type}'; upgrade to transformer-lens>=4 (TransformerBridge) for other architectures"
        )
    cfg = HookedTransformerConfig(
        n_layers=hc.n_layer, d_model=hc.n_embd, n_ctx=hc.n_positions, d_head=hc.n_embd // hc.n_head,
        n_heads=hc.n_head, d_mlp=hc.n_inner or 4 * hc.n_embd, d_vocab=hc.vocab_size,
        act_fn=hc.activation_function, normalization_type="LN", eps=hc.layer_norm_epsilon,
        use_attn_scale=hc.scale_attn_weights, scale_attn_by_inverse_layer_idx=hc.scale_attn_by_inverse_layer_idx,
        model_name=Path(name).name, default_prepend_bos=True, device=str(device), dtype=dtype,
        original_architecture="GPT2LMHeadModel", init_weights=False,
    )
    model = HookedTransformer(cfg, tokenizer=AutoTokenizer.from_pretrained(name), move_to_device=True)
    model.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=False, center_writing_weights=False, center_unembed=False,
        fold_value_biases=False,
    )
    return model.to(device)


# =====================================================================================================
# Parameters for the weight-restricted LLC (added for tl_degeneracy.behavioral, issue 6)
#
# SGLD needs the model's forward at parameter values other than its own, for several chains at once, and
# masks that pick parameter slices by their TransformerLens meaning ("blocks.3.attn.h5"). Both depend on
# the major version: 4.x bridges keep HF-internal parameters reachable under several module paths (the
# bridge's `named_parameters` even names them relative to the wrapped model), 3.x `HookedTransformer`s
# hold W_Q [n_heads, d_model, d_head] directly. This section hides that from tl_degeneracy.behavioral.
# =====================================================================================================


@contextlib.contextmanager
def preserved_state(model: Any) -> Iterator[None]:
    """Whatever happens inside, leave every module's parameters (the objects themselves), their
    ``requires_grad`` flags and every module's train/eval flag as they were (the one save-and-restore of a
    model's state; also after an exception or an interrupt).

    Example::

        with preserved_state(model):
            model.train()                      # back in eval mode afterwards
    """
    if isinstance(model, ModelAdapter):
        model = model.model
    modules = list(torch.nn.Module.modules(model))
    params = [(m, name, p) for m in modules for name, p in m._parameters.items()]
    flags = [(p, p.requires_grad) for _, _, p in params if p is not None]
    modes = [(m, m.training) for m in modules]
    try:
        yield
    finally:
        for m, name, p in params:
            if m._parameters.get(name) is not p:
                m._parameters[name] = p
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The HuggingFace tokenizer saved in a ``save_pretrained`` folder (offline)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# =====================================================================================================
# The bundled modular-addition model (issue 20): a folder holding a TransformerLens state dict
#
# `tl_degeneracy/bundled/modadd-113/` (made by scripts/train_modadd.py) has no HuggingFace architecture:
# `config.json` holds
# HookedTransformerConfig fields plus "tl_degeneracy_format": "hooked_transformer_state_dict", and
# `model.safetensors` holds the weights under HookedTransformer's state-dict names and shapes
# (`blocks.0.attn.W_Q` [n_heads, d_model, d_head], ...). 4.x builds a `boot_native` bridge and loads them
# through TransformerLens's own converter; 3.x builds a `HookedTransformer` and loads them as they are.
# =====================================================================================================

_TL_STATE_DICT_FORMAT = "hooked_transformer_state_dict"
# HookedTransformerConfig fields read from config.json (both majors accept each of them)
_TL_CONFIG_FIELDS = (
    "n_layers", "d_model", "n_heads", "d_head", "d_mlp", "d_vocab", "d_vocab_out", "n_ctx", "act_fn",
    "normalization_type", "attn_only", "positional_embedding_type", "model_name",
)


# the folder each state-dict model was loaded from (weak keys: a model that is garbage-collected drops out);
# tl_degeneracy.modadd_data reads the token file beside it, so a seed's data follow that seed's model
_SOURCE_FOLDERS: weakref.WeakKeyDictionary[Any, Path] = weakref.WeakKeyDictionary()


def state_dict_source(model: Any) -> Path | None:
    """The folder :func:`load_model` loaded a TransformerLens state-dict model (``modadd-113``) from, or ``None``
    when this model object did not come from one (built in code, a copy, a HuggingFace model).

    Example::

        state_dict_source(load_model("modadd-113"))    # .../tl_degeneracy/bundled/modadd-113
    """
    if isinstance(model, ModelAdapter):
        model = model.model
    try:
        return _SOURCE_FOLDERS.get(model)
    except TypeError:  # not weak-referenceable: certainly not one of ours
        return None


def _bundled_dir() -> Path:
    """The package's bundled-data folder (``tl_degeneracy/bundled/``, or ``$TL_DEGENERACY_DATA``).

    The same folder as :data:`tl_degeneracy.data.DATA_DIR`, found here without importing ``data``
    (the layer rules let ``data`` import the adapter, not the reverse).
    """
    if os.environ.get("TL_DEGENERACY_DATA"):
        return Path(os.environ["TL_DEGENERACY_DATA"])
    return Path(str(importlib.resources.files("tl_degeneracy").joinpath("bundled")))


def _tl_state_dict_folder(name_or_path: str | os.PathLike) -> Path | None:
    """The folder of a TransformerLens state-dict model (a path, or a bundled name such as ``"modadd-113"``).

    ``None`` when ``name_or_path`` is neither (then :func:`load_model` goes on as for HuggingFace models).
    """
    for folder in (Path(name_or_path), _bundled_dir() / str(name_or_path)):
        config = folder / "config.json"
        if config.is_file() and (folder / "model.safetensors").is_file():
            try:
                fmt = json.loads(config.read_text()).get("tl_degeneracy_format")
            except (json.JSONDecodeError, AttributeError):
                continue
            if fmt == _TL_STATE_DICT_FORMAT:
                return folder
    return None


def _load_modadd(path: str | os.PathLike, *, device: str | torch.device, dtype: torch.dtype) -> Any:
    """Load a TransformerLens state-dict folder (the bundled ``modadd-113``) as a model of the installed major.

    4.x: ``TransformerBridge.boot_native`` with the saved config, then the weights converted by
    ``transformer_lens.utilities.tl_checkpoint_conversion.convert_tl_checkpoint`` and loaded strictly.
    3.x: ``HookedTransformer(HookedTransformerConfig(...))`` and ``load_state_dict``; only the attention
    mask buffers (``mask``, ``IGNORE``), which the file does not hold, may be missing.
    Returns the model in eval mode, with no tokenizer (feed token ids).

    Example::

        model = _load_modadd(tld.data.DATA_DIR / "modadd-113", device="cpu", dtype=torch.float32)
        model(torch.tensor([[3, 5, 113]]))[0, -1].argmax()   # tensor(8)
    """
    from safetensors.torch import load_file

    folder = Path(path)
    saved = json.loads((folder / "config.json").read_text())
    if saved.get("tl_degeneracy_format") != _TL_STATE_DICT_FORMAT:
        raise BadInputError(f"'{folder}/config.json' does not describe a TransformerLens state-dict folder")
    fields = {key: saved[key] for key in _TL_CONFIG_FIELDS if key in saved}
    weights = load_file(str(folder / "model.safetensors"))
    if transformer_lens_version().startswith(("0.", "1.", "2.", "3.")):
        from transformer_lens import HookedTransformer, HookedTransformerConfig

        model = HookedTransformer(HookedTransformerConfig(**fields, device=str(device), dtype=dtype))
        result = model.load_state_dict(weights, strict=False)
        missing = [k for k in result.missing_keys if not k.endswith((".mask", ".IGNORE"))]
        if missing or result.unexpected_keys:
            raise BadInputError(
                f"'{folder}' does not match its config: missing {missing}, unexpected {result.unexpected_keys}"
            )
    else:
        from transformer_lens.config import TransformerBridgeConfig
        from transformer_lens.model_bridge import TransformerBridge
        from transformer_lens.utilities.tl_checkpoint_conversion import convert_tl_checkpoint

        cfg = TransformerBridgeConfig(**fields, seed=0)
        model = TransformerBridge.boot_native(cfg, device=device, dtype=dtype, model_name=fields["model_name"])
        model.load_state_dict(convert_tl_checkpoint(weights, cfg), strict=True)
    model.eval()
    _SOURCE_FOLDERS[model] = folder.resolve()
    return model
