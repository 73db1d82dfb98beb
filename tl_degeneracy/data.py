"""Token data: rows of token ids with a mask of the positions that count (SPEC §0).

Every source becomes a ``[rows, T]`` LongTensor of ids and a ``[rows, T]`` bool mask, validated against the
model up front, then served in a fixed order as :class:`TokenBatch` es. Padding never counts; the first
position of every row (the BOS position) is excluded unless ``include_bos=True``.

Example::

    data = tld.token_batches(model, ["def f(x):\\n    return x"], seq_len=64, batch_size=8)
    for batch in data:
        batch.tokens, batch.mask          # [B, T] long, [B, T] bool
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int
from safetensors.torch import load_file

from tl_degeneracy.errors import BadInputError
from tl_degeneracy.model import as_adapter

#: folder of the data shipped with the project (the bundled model and token files); the repository's
#: ``data/`` (a source checkout or an editable install), or ``$TL_DEGENERACY_DATA`` when set
DATA_DIR = Path(os.environ.get("TL_DEGENERACY_DATA", Path(__file__).resolve().parent.parent / "data"))


@dataclass(frozen=True)
class TokenBatch:
    """One batch: ``tokens`` [B, T] ids, ``mask`` [B, T] which positions count, ``index`` its place in order."""

    tokens: Int[torch.Tensor, "batch pos"]
    mask: Bool[torch.Tensor, "batch pos"]
    index: int


@dataclass
class TokenBatches:
    """A re-iterable, deterministic sequence of :class:`TokenBatch` (what :func:`token_batches` returns)."""

    tokens: Int[torch.Tensor, "rows pos"]
    mask: Bool[torch.Tensor, "rows pos"]
    batch_size: int
    description: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.tokens.shape != self.mask.shape or self.tokens.ndim != 2:
            raise BadInputError(
                f"tokens {tuple(self.tokens.shape)} and mask {tuple(self.mask.shape)} must both be [rows, T]"
            )
        if self.batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {self.batch_size}")

    def __len__(self) -> int:
        return -(-self.tokens.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[TokenBatch]:
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield TokenBatch(self.tokens[sl], self.mask[sl], i)

    @property
    def seq_len(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def n_counted(self) -> int:
        """N: the number of counted tokens over all batches."""
        return int(self.mask.sum())

    def describe(self) -> dict[str, Any]:
        return {
            **self.description,
            "rows": int(self.tokens.shape[0]),
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "n_batches": len(self),
            "n_counted": self.n_counted,
        }

    def validate_for(self, model: Any) -> None:
        """Check ids and length against a model (the model may differ from the one that built the batches)."""
        adapter = as_adapter(model)
        _validate(self.tokens, self.mask, adapter.d_vocab, adapter.n_ctx)


def bundled_model_path() -> Path:
    """Folder of the small GPT-2 trained on the Python standard library that ships in ``data/``.

    Load it offline with ``tld.load_model(tld.bundled_model_path())``.
    """
    path = DATA_DIR / "stdlib-gpt2"
    if not (path / "config.json").exists():
        raise BadInputError(
            f"the bundled model is not at '{path}': use a source checkout of tl_degeneracy (pip install -e .) "
            "or set TL_DEGENERACY_DATA to the folder holding stdlib-gpt2/"
        )
    return path


def bundled_data_path(name: str = "stdlib-heldout") -> Path:
    """Path of a token file shipped in ``data/`` (``name`` without the ``.safetensors`` suffix)."""
    return DATA_DIR / f"{name}.safetensors"


def token_batches(
    model: Any,
    source: Any,
    *,
    seq_len: int = 128,
    batch_size: int = 16,
    n_tokens: int | None = None,
    include_bos: bool = False,
    prepend_bos: bool = True,
    attention_mask: torch.Tensor | None = None,
    text_column: str | None = None,
) -> TokenBatches:
    """Token batches from a LongTensor, a list of strings, a ``datasets.Dataset`` or a token file.

    - ``LongTensor [B, T]``: rows as given (``seq_len`` is ignored); ``attention_mask`` [B, T] marks padding,
      which must sit at the end of a row (right padding: the model runs without an attention mask, and causal
      attention keeps trailing padding away from every counted token; left padding is refused).
      A 1-D LongTensor is a token stream, chunked like a token file.
    - ``list[str]`` / ``datasets.Dataset`` (``text_column``, default the only string column or ``"text"``):
      each text is tokenised, followed by the tokenizer's end-of-text token, concatenated, and cut into rows of
      ``seq_len - 1`` ids, each row prefixed with BOS (``prepend_bos``); the last row is padded, and
      padding never counts.
    - a path or bundled name (``"stdlib-heldout"``): a ``.safetensors`` file whose ``"tokens"`` entry is a
      1-D token stream, chunked as above.

    The first position of each row is the BOS position and is excluded unless ``include_bos``. ``n_tokens``
    caps the number of counted tokens exactly (later rows are dropped, the last kept row is cut).
    Raises :class:`BadInputError` before anything runs: ids outside the vocabulary, ``seq_len`` above
    ``n_ctx``, no counted token, text given to a model without a tokenizer.
    """
    adapter = as_adapter(model)
    if seq_len < 2 and not isinstance(source, torch.Tensor):
        raise BadInputError(f"seq_len must be at least 2, got {seq_len}")
    if not isinstance(source, torch.Tensor) and seq_len > adapter.n_ctx:
        raise BadInputError(
            f"seq_len={seq_len} is longer than the model's context n_ctx={adapter.n_ctx}; pass seq_len<={adapter.n_ctx}"
        )
    bos = adapter.bos_token_id if prepend_bos else None
    pad_id = 0
    if isinstance(source, torch.Tensor):
        if source.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise BadInputError(f"token tensor must hold integer ids, got dtype {source.dtype}")
        if source.ndim == 2:
            tokens = source.long().cpu()
            pad = torch.zeros_like(tokens, dtype=torch.bool)
            if attention_mask is not None:
                if attention_mask.shape != tokens.shape:
                    raise BadInputError(
                        f"attention_mask {tuple(attention_mask.shape)} must match tokens {tuple(tokens.shape)}"
                    )
                pad = ~attention_mask.bool().cpu()
                if bool((pad[:, :-1] & ~pad[:, 1:]).any()):
                    raise BadInputError(
                        "attention_mask has padding before real tokens (left padding); the model is run "
                        "without an attention mask, so pad on the right only (tokenizer.padding_side='right'): "
                        "with causal attention, right padding never reaches a counted token"
                    )
            desc = {"source": "tensor"}
        elif source.ndim == 1:
            tokens, pad = _chunk(source.long().cpu(), seq_len, bos, pad_id)
            desc = {"source": "token stream"}
        else:
            raise BadInputError(f"token tensor must be [B, T] or a 1-D stream, got shape {tuple(source.shape)}")
    elif isinstance(source, (str, Path)) and (Path(source).suffix == ".safetensors" or Path(source).exists()
                                             or bundled_data_path(str(source)).exists()):
        path = Path(source) if Path(source).exists() else bundled_data_path(str(source))
        if not path.exists():
            raise BadInputError(f"token file '{source}' not found")
        entries = load_file(str(path))
        if "tokens" not in entries or entries["tokens"].ndim != 1:
            raise BadInputError(f"'{path}' must hold a 1-D 'tokens' entry (a token stream)")
        tokens, pad = _chunk(entries["tokens"].long(), seq_len, bos, pad_id)
        desc = {"source": "token file", "path": str(path)}
    elif isinstance(source, str):
        raise BadInputError(
            f"'{source}' is neither a token file nor a bundled data set; pass a list of strings for raw text"
        )
    else:
        texts, desc = _texts(source, text_column)
        eot = _end_of_text(adapter)
        stream: list[int] = []
        for ids in adapter.tokenize(texts):
            stream.extend(ids)
            if eot is not None:
                stream.append(eot)
        tokens, pad = _chunk(torch.tensor(stream, dtype=torch.long), seq_len, bos, pad_id)
        desc = {**desc, "tokenizer": getattr(adapter.tokenizer, "name_or_path", None)}

    mask = ~pad
    if not include_bos:
        mask[:, 0] = False
    if n_tokens is not None:
        tokens, mask = _cap(tokens, mask, n_tokens)
    _validate(tokens, mask, adapter.d_vocab, adapter.n_ctx)
    desc.update({"include_bos": include_bos, "prepend_bos": bos is not None, "n_tokens_cap": n_tokens})
    return TokenBatches(tokens, mask, batch_size, desc)


def _texts(source: Any, text_column: str | None) -> tuple[list[str], dict[str, Any]]:
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)):
        texts = list(source)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise BadInputError("a list source must be a non-empty list of strings")
        return texts, {"source": "texts", "n_texts": len(texts)}
    column_names = getattr(source, "column_names", None)
    if column_names is None:
        raise BadInputError(
            f"unsupported data source {type(source).__name__}: pass a LongTensor, a list of strings, "
            "a datasets.Dataset or the path of a token file"
        )
    if text_column is None:
        string_cols = [c for c in column_names if getattr(source.features[c], "dtype", None) == "string"]
        text_column = "text" if "text" in column_names else (string_cols[0] if len(string_cols) == 1 else None)
    if text_column not in column_names:
        raise BadInputError(f"dataset has columns {column_names}; pass text_column= naming the text column")
    texts = list(source[text_column])
    if not texts:
        raise BadInputError("the dataset is empty")
    return texts, {"source": "datasets.Dataset", "text_column": text_column, "n_texts": len(texts)}


def _end_of_text(adapter: Any) -> int | None:
    tok = adapter.tokenizer
    eos = getattr(tok, "eos_token_id", None)
    return None if eos is None else int(eos)


def _chunk(
    stream: torch.Tensor, seq_len: int, bos: int | None, pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut a 1-D stream into rows of ``seq_len`` (BOS first when given); returns (tokens, is_padding)."""
    if stream.numel() == 0:
        raise BadInputError("the data holds no tokens")
    body = seq_len - 1 if bos is not None else seq_len
    n_rows = -(-stream.numel() // body)
    padded = torch.full((n_rows * body,), pad_id, dtype=torch.long)
    padded[: stream.numel()] = stream
    is_pad = torch.ones(n_rows * body, dtype=torch.bool)
    is_pad[: stream.numel()] = False
    rows, pad = padded.view(n_rows, body), is_pad.view(n_rows, body)
    if bos is not None:
        rows = torch.cat([torch.full((n_rows, 1), bos, dtype=torch.long), rows], dim=1)
        pad = torch.cat([torch.zeros((n_rows, 1), dtype=torch.bool), pad], dim=1)
    return rows, pad


def _cap(tokens: torch.Tensor, mask: torch.Tensor, n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n_tokens < 1:
        raise BadInputError(f"n_tokens must be >= 1, got {n_tokens}")
    flat = mask.flatten().long().cumsum(0).view_as(mask)
    mask = mask & (flat <= n_tokens)
    keep = mask.any(dim=1)
    last = int(keep.nonzero().max()) + 1 if keep.any() else 0
    return tokens[:last].clone(), mask[:last].clone()


def _validate(tokens: torch.Tensor, mask: torch.Tensor, d_vocab: int, n_ctx: int) -> None:
    if tokens.numel() == 0 or not bool(mask.any()):
        raise BadInputError(
            "no counted tokens: the data is empty or every position is padding/BOS; "
            "give more text or pass include_bos=True"
        )
    if tokens.shape[1] > n_ctx:
        raise BadInputError(
            f"sequences of length {tokens.shape[1]} are longer than the model's context n_ctx={n_ctx}; "
            f"cut them to at most {n_ctx} tokens"
        )
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= d_vocab:
        bad = hi if hi >= d_vocab else lo
        raise BadInputError(
            f"token id {bad} is outside the model's vocabulary [0, {d_vocab}); "
            "the data was tokenised for another model"
        )


# =====================================================================================================
# Modular-addition data for the bundled grokked model (issue 20)
#
# `data/modadd-{p}-tokens.safetensors` (made by scripts/train_modadd.py) holds every input "a b =" of the
# task: `tokens` [p², 3] int32 (row a * p + b is [a, b, p]), `labels` [p²] int32 ((a + b) mod p) and
# `is_train` [p²] bool (the model's training pairs). Only the last position (the answer) is an output.
# =====================================================================================================

#: the position of "=" in a modular-addition input, where the answer is read
MODADD_ANSWER_POSITION = 2


@dataclass(frozen=True)
class ModAddData:
    """Modular-addition inputs and answers (what :func:`modadd_data` returns).

    ``tokens`` [N, 3] long (``[a, b, p]``), ``labels`` [N] long (``(a + b) mod p``), ``is_train`` [N] bool
    (whether each pair was a training pair of the bundled model), ``p``, ``split`` and
    ``answer_position`` (2: only that position's logits are an output; activations at every position
    can matter, SPEC §5b).
    """

    tokens: Int[torch.Tensor, "rows 3"]
    labels: Int[torch.Tensor, " rows"]
    is_train: Bool[torch.Tensor, " rows"]
    p: int
    split: str
    answer_position: int = MODADD_ANSWER_POSITION

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @torch.no_grad()
    def accuracy(self, model: Any, *, batch_size: int = 4096) -> float:
        """Fraction of rows whose argmax logit at the answer position (over the p numbers) is the label."""
        adapter = as_adapter(model)
        correct = 0
        with adapter.eval_mode():
            for start in range(0, len(self), batch_size):
                rows = slice(start, start + batch_size)
                tokens = self.tokens[rows].to(adapter.device)
                logits = adapter.forward(tokens)[:, self.answer_position, : self.p]
                correct += int((logits.argmax(-1).cpu() == self.labels[rows]).sum())
        return correct / len(self)


def modadd_data(
    model: Any = None,
    *,
    split: str = "all",
    p: int | None = None,
    path: str | os.PathLike | None = None,
) -> ModAddData:
    """All modular-addition pairs of a bundled token file, or its training or held-out share.

    ``p`` defaults to the model's (``d_vocab - 1``: tokens ``0..p-1`` are numbers and ``p`` is "="), or to
    113 without a model; ``path`` defaults to the bundled ``data/modadd-{p}-tokens.safetensors``.
    ``split``: ``"all"`` (the p² pairs, row ``a * p + b``), ``"train"`` (the pairs the bundled model was
    trained on) or ``"test"`` (the held-out pairs). With a model, the ids are checked against its vocabulary
    and context. Raises :class:`BadInputError` for an unknown split or a file that does not fit.

    Example::

        model = tld.load_model("modadd-113")
        test = tld.modadd_data(model, split="test")      # the 8938 held-out pairs
        test.tokens[0], test.labels[0]                   # tensor([0, 0, 113]), tensor(0)
        test.accuracy(model)                             # 1.0 for the bundled model
        data = tld.token_batches(model, test.tokens, include_bos=True, batch_size=1024)   # every position counts
    """
    if split not in ("all", "train", "test"):
        raise BadInputError(f"split must be 'all', 'train' or 'test', got {split!r}")
    adapter = None if model is None else as_adapter(model)
    if p is None:
        p = 113 if adapter is None else adapter.d_vocab - 1
    file = Path(path) if path is not None else bundled_data_path(f"modadd-{p}-tokens")
    if not file.is_file():
        raise BadInputError(
            f"modular-addition token file '{file}' not found; make one with scripts/train_modadd.py --p {p}"
        )
    entries = load_file(str(file))
    missing = {"tokens", "labels", "is_train"} - set(entries)
    if missing:
        raise BadInputError(f"'{file}' lacks {sorted(missing)}: not a modular-addition token file")
    tokens, labels, is_train = entries["tokens"].long(), entries["labels"].long(), entries["is_train"].bool()
    if tokens.shape != (p * p, 3) or int(tokens[:, 2].min()) != p or int(tokens[:, 2].max()) != p:
        raise BadInputError(f"'{file}' does not hold the {p * p} inputs [a, b, {p}] of p = {p}")
    if adapter is not None:
        _validate(tokens, torch.ones_like(tokens, dtype=torch.bool), adapter.d_vocab, adapter.n_ctx)
    keep = {"all": torch.ones_like(is_train), "train": is_train, "test": ~is_train}[split]
    return ModAddData(tokens[keep], labels[keep], is_train[keep], p, split)
