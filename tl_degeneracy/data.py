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

import hashlib
import importlib.resources
import json
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Int

from tl_degeneracy._io import load_tensors, tensors_checksum
from tl_degeneracy.adapter import as_adapter, load_tokenizer, state_dict_source
from tl_degeneracy.errors import BadInputError

#: fewer counted tokens than this fraction of the ``n_tokens`` asked for is refused by :func:`load_data`
MIN_TOKEN_FRACTION = 0.1


def _package_data_dir() -> Path:
    """The package's own ``tl_degeneracy/bundled/`` folder, found through :mod:`importlib.resources`."""
    folder = importlib.resources.files("tl_degeneracy").joinpath("bundled")
    return Path(str(folder))


#: folder of the data shipped with the package (the bundled model and token files): the package data
#: ``tl_degeneracy/bundled/`` (in a wheel as in a source checkout), or ``$TL_DEGENERACY_DATA`` when set
DATA_DIR = Path(os.environ["TL_DEGENERACY_DATA"]) if os.environ.get("TL_DEGENERACY_DATA") else _package_data_dir()


@dataclass(frozen=True)
class TokenBatch:
    """One batch: ``tokens`` [B, T] ids, ``mask`` [B, T] the counted positions (whose activations enter every
    statistic), ``index`` its place in order, ``outputs`` [B, T] the output positions whose logits define the
    behavioral loss and the Jacobian metric (SPEC §5b; ``None``: the counted positions)."""

    tokens: Int[torch.Tensor, "batch pos"]
    mask: Bool[torch.Tensor, "batch pos"]
    index: int
    outputs: Bool[torch.Tensor, "batch pos"] | None = None

    @property
    def output_mask(self) -> Bool[torch.Tensor, "batch pos"]:
        """The output positions (the counted positions unless the batches were built with ``outputs=``)."""
        return self.mask if self.outputs is None else self.outputs


@dataclass
class TokenBatches:
    """A re-iterable, deterministic sequence of :class:`TokenBatch` (what :func:`token_batches` returns)."""

    tokens: Int[torch.Tensor, "rows pos"]
    mask: Bool[torch.Tensor, "rows pos"]
    batch_size: int
    description: dict[str, Any] = field(default_factory=dict)
    #: output positions [rows, T] (SPEC §5b); ``None``: the counted positions (``mask``)
    outputs: Bool[torch.Tensor, "rows pos"] | None = None

    def __post_init__(self) -> None:
        if self.tokens.shape != self.mask.shape or self.tokens.ndim != 2:
            raise BadInputError(
                f"tokens {tuple(self.tokens.shape)} and mask {tuple(self.mask.shape)} must both be [rows, T]"
            )
        if self.outputs is not None and self.outputs.shape != self.mask.shape:
            raise BadInputError(f"outputs {tuple(self.outputs.shape)} must match mask {tuple(self.mask.shape)}")
        if self.batch_size < 1:
            raise BadInputError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.tokens.dtype.is_floating_point or self.tokens.dtype.is_complex or self.tokens.dtype == torch.bool:
            raise BadInputError(
                f"tokens must be integer ids, got dtype {self.tokens.dtype}; convert with .long() after checking "
                "that every id is a whole number"
            )
        if self.mask.dtype != torch.bool:
            raise BadInputError(f"mask must be a bool tensor, got dtype {self.mask.dtype}")

    def __len__(self) -> int:
        return -(-self.tokens.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[TokenBatch]:
        for i in range(len(self)):
            sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
            yield TokenBatch(self.tokens[sl], self.mask[sl], i, None if self.outputs is None else self.outputs[sl])

    def with_batch_size(self, batch_size: int) -> TokenBatches:
        """The same rows and masks in batches of ``batch_size``."""
        return TokenBatches(self.tokens, self.mask, batch_size, self.description, self.outputs)

    @property
    def output_mask(self) -> Bool[torch.Tensor, "rows pos"]:
        """The output positions of every row (the counted positions unless built with ``outputs=``)."""
        return self.mask if self.outputs is None else self.outputs

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
            **({} if self.outputs is None else {"n_outputs": int(self.outputs.sum())}),
            "fingerprint": self.fingerprint,
        }

    @property
    def fingerprint(self) -> str:
        """A hash of the ids and the mask: the identity of the data in statistics, checkpoints and markers."""
        parts = {"tokens": self.tokens.long(), "mask": self.mask}
        return tensors_checksum(parts if self.outputs is None else {**parts, "outputs": self.outputs})

    def validate_for(self, model: Any) -> None:
        """Check ids and length against a model (the model may differ from the one that built the batches)."""
        adapter = as_adapter(model)
        _validate(self.tokens, self.mask, adapter.d_vocab, adapter.n_ctx)


def bundled_model_path() -> Path:
    """Folder of the small GPT-2 trained on the Python standard library that ships with the package.

    It is package data (``tl_degeneracy/bundled/stdlib-gpt2``), so a plain ``pip install`` of the wheel has it;
    ``$TL_DEGENERACY_DATA`` points elsewhere (a folder holding ``stdlib-gpt2/`` and the token files).

    Load it offline with ``tld.load_model(tld.bundled_model_path())``.
    """
    path = DATA_DIR / "stdlib-gpt2"
    if not (path / "config.json").exists():
        raise BadInputError(
            f"the bundled model is not at '{path}': reinstall tl-degeneracy (its wheel carries the model) "
            "or set TL_DEGENERACY_DATA to a folder holding stdlib-gpt2/"
        )
    return path


def bundled_data_path(name: str = "stdlib-heldout") -> Path:
    """Path of a token file shipped with the package (``name`` without the ``.safetensors`` suffix).

    Example: ``tld.bundled_data_path()`` is the held-out stream ``stdlib-heldout.safetensors``;
    ``tld.bundled_data_path("stdlib-train-sample")`` the first tokens of the training stream.
    """
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
    count: str | torch.Tensor | None = None,
    outputs: str | torch.Tensor = "counted",
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

    Positions (SPEC §5b, §6). ``count`` chooses the *counted* positions, whose activations enter every
    statistic: ``None`` (default) every non-padding position but the first of each row (the BOS position;
    ``include_bos=True`` keeps it), ``"all"`` every non-padding position, ``"last"`` the last non-padding
    position of each row, or a boolean mask [T] or [rows, T]. ``outputs`` chooses the *output* positions,
    whose logits define the behavioral loss, the Jacobian metric F and the probes: ``"counted"`` (default)
    the counted positions, ``"last"``, or a mask. Padding never counts in either. ``n_tokens`` caps the number
    of counted tokens exactly (later rows are dropped, the last kept row is cut).

    Example (a modular-addition model read at its answer): every position's activations, the loss at the
    last one only::

        data = tld.token_batches(model, tokens, batch_size=256, count="all", outputs="last")
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
        tokens, pad = _chunk(_token_stream(path), seq_len, bos, pad_id)
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

    if include_bos and count is not None:
        raise BadInputError("pass either include_bos=True or count=..., not both (count='all' includes BOS)")
    mask = _positions(~pad, "all" if include_bos else count, what="count")
    out_mask = None if isinstance(outputs, str) and outputs == "counted" else _positions(~pad, outputs,
                                                                                         what="outputs")
    if n_tokens is not None:
        before = mask
        tokens, mask = _cap(tokens, mask, n_tokens)
        if out_mask is not None:
            out_mask = out_mask[: tokens.shape[0]].clone()
            last_row = tokens.shape[0] - 1
            if last_row >= 0 and not torch.equal(mask[last_row], before[last_row]):
                # the cap cut the last row after its last kept counted token: its outputs are cut there too
                out_mask[last_row, int(mask[last_row].nonzero().max()) + 1:] = False
    _validate(tokens, mask, adapter.d_vocab, adapter.n_ctx)
    if out_mask is not None and not bool(out_mask.any()):
        raise BadInputError("no output positions: the outputs= mask selects no non-padding position")
    desc.update({"include_bos": include_bos, "prepend_bos": bos is not None, "n_tokens_cap": n_tokens,
                 "count": _describe_positions(count, include_bos), "outputs": _describe_positions(outputs, False)})
    return TokenBatches(tokens, mask, batch_size, desc, out_mask)


def _positions(real: Bool[torch.Tensor, "rows pos"], choice: str | torch.Tensor | None, *,
               what: str) -> Bool[torch.Tensor, "rows pos"]:
    """Positions of ``real`` (non-padding) chosen by ``choice`` (see :func:`token_batches`)."""
    if choice is None:  # every real position but the first (BOS) of each row
        out = real.clone()
        out[:, 0] = False
        return out
    if isinstance(choice, str):
        if choice == "all":
            return real.clone()
        if choice == "last":
            last = real.long().cumsum(1).argmax(1)  # the first position reaching the row's count
            out = torch.zeros_like(real)
            has = real.any(1)
            out[has.nonzero().squeeze(1), last[has]] = True
            return out
        options = "'all', 'last'" + (", None" if what == "count" else ", 'counted'")
        raise BadInputError(f"{what}={choice!r} is not a position choice; pass {options} or a boolean mask")
    if not isinstance(choice, torch.Tensor) or choice.dtype != torch.bool:
        raise BadInputError(f"{what}= must be a string or a boolean mask [T] or [rows, T], got {type(choice).__name__}"
                            + (f" of dtype {choice.dtype}" if isinstance(choice, torch.Tensor) else ""))
    m = choice.cpu()
    if m.ndim == 1:
        m = m.expand_as(real) if m.shape[0] == real.shape[1] else m
    if m.shape != real.shape:
        raise BadInputError(f"{what} mask {tuple(choice.shape)} must be [T] = [{real.shape[1]}] or [rows, T] = "
                            f"{list(real.shape)}")
    return m & real


def _describe_positions(choice: str | torch.Tensor | None, include_bos: bool) -> str:
    if include_bos:
        return "all"
    if choice is None:
        return "all but the first (BOS) position"
    if isinstance(choice, str):
        return choice
    return f"mask of {int(choice.sum())} positions, shape {list(choice.shape)}"


def _token_stream(path: Path) -> torch.Tensor:
    """The 1-D ``"tokens"`` entry of a token file as int64; float ids must be whole numbers."""
    entries, _ = load_tensors(path, what="token file")
    stream = entries.get("tokens")
    if stream is None or stream.ndim != 1:
        raise BadInputError(f"'{path}' must hold a 1-D 'tokens' entry (a token stream)")
    if stream.dtype.is_floating_point:
        if not bool(torch.isfinite(stream).all()) or bool((stream != stream.round()).any()):
            raise BadInputError(
                f"'{path}' holds float token ids that are not whole numbers; token ids are integers: "
                "write the file with an integer dtype (e.g. tokens.long())"
            )
    elif stream.dtype == torch.bool or stream.dtype.is_complex:
        raise BadInputError(f"'{path}': 'tokens' has dtype {stream.dtype}; token ids are integers")
    return stream.long()


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


# ---------------------------------------------------------------------------------------------------------
# sources named on the command line: bundled token files, text files and folders
# ---------------------------------------------------------------------------------------------------------
#: suffixes of the files a ``--data`` folder contributes
TEXT_SUFFIXES = (".txt", ".py", ".md", ".rst", ".json", ".c", ".h", ".js", ".ts", ".html", ".tex")


def load_data(model: Any, source: str | None, *, seq_len: int, batch_size: int,
              n_tokens: int | None) -> TokenBatches:
    """Token batches for a run from ``--data``: a bundled token-file name or path, a text file, or a folder.

    - ``None``: the bundled held-out file (``bundled_data_path()``).
    - a ``.safetensors`` token file (1-D ``"tokens"``) or the name of one in ``data/``. The bundled files hold
      ids of the bundled model's tokenizer; for a model with another tokenizer (e.g. ``gpt2``) they are
      decoded to text with the bundled tokenizer and tokenised again with the model's.
    - a text file: one document; a folder: every text file in it (``TEXT_SUFFIXES``, sorted by path).
    """
    if source is None:
        path = bundled_data_path()
        if not path.is_file():
            raise BadInputError(f"the bundled held-out data is not at '{path}'; pass --data FILE_OR_FOLDER")
    else:
        path = Path(source).expanduser()
        if not path.exists() and bundled_data_path(str(source)).is_file():
            path = bundled_data_path(str(source))
    kwargs = {"seq_len": seq_len, "batch_size": batch_size, "n_tokens": n_tokens}
    if path.suffix == ".safetensors" and path.is_file():
        texts = _bundled_texts_for(model, path)
        if texts is None:
            return _enough(token_batches(model, path, **kwargs), n_tokens, source)
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)
        if not files:
            raise BadInputError(f"--data folder '{path}' holds no text files ({', '.join(TEXT_SUFFIXES)})")
        texts = [_read_text(p) for p in files]
    elif path.is_file():
        texts = [_read_text(path)]
    else:
        raise BadInputError(
            f"--data '{source}': no such file or folder, and no bundled data set of that name in "
            f"{bundled_data_path(str(source)).parent}"
        )
    return _enough(_texts_to_batches(model, texts, **kwargs), n_tokens, source)


def _read_text(path: Path) -> str:
    """A text file's contents; an empty or binary file (NUL bytes, not UTF-8) is refused."""
    raw = path.read_bytes()
    if not raw.strip():
        raise BadInputError(f"--data file '{path}' is empty; give a file with text in it")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    if text is None or "\x00" in text:
        raise BadInputError(
            f"--data file '{path}' is not UTF-8 text (a binary file?); give a text file, a folder of text "
            "files or a .safetensors token file"
        )
    return text


def _enough(batches: TokenBatches, n_tokens: int | None, source: Any) -> TokenBatches:
    """Warn when the data holds fewer counted tokens than asked for; refuse below ``MIN_TOKEN_FRACTION``."""
    if n_tokens is None or batches.n_counted >= n_tokens:
        return batches
    have = batches.n_counted
    if have < MIN_TOKEN_FRACTION * n_tokens:
        raise BadInputError(
            f"--data '{source}' gives {have} counted tokens, under {MIN_TOKEN_FRACTION:.0%} of the {n_tokens} asked "
            f"for; give more data or lower --n-tokens to at most {have}"
        )
    warnings.warn(f"--data '{source}' gives {have} counted tokens, fewer than the {n_tokens} asked for; "
                  f"the statistics use {have}", stacklevel=3)
    return batches


def _texts_to_batches(model: Any, texts: list[str], *, n_tokens: int | None, **kwargs: Any) -> TokenBatches:
    """``token_batches`` of texts, tokenising only a prefix of the texts when ``n_tokens`` caps the count.

    The prefix holds 8 characters per wanted token (BPE tokens of code and prose average 3–4), and grows
    fourfold until it gives ``n_tokens`` counted tokens or holds every text.
    """
    budget = None if n_tokens is None else 8 * (n_tokens + 1024)
    while True:
        if budget is None or budget >= sum(len(t) for t in texts):
            return token_batches(model, texts, n_tokens=n_tokens, **kwargs)
        prefix, left = [], budget
        for text in texts:
            prefix.append(text[:left])
            left -= len(prefix[-1])
            if left <= 0:
                break
        batches = token_batches(model, prefix, n_tokens=n_tokens, **kwargs)
        if batches.n_counted >= n_tokens:
            return batches
        budget *= 4


def _bundled_texts_for(model: Any, path: Path) -> list[str] | None:
    """Texts of a bundled token file when ``model`` has another tokenizer than the bundled one, else None."""
    if path.resolve().parent != bundled_data_path().resolve().parent:
        return None
    tokenizer = getattr(model, "tokenizer", None)
    try:
        bundled = load_tokenizer(bundled_model_path())
    except (OSError, BadInputError):
        return None
    if tokenizer is None or tokenizer.get_vocab() == bundled.get_vocab():
        return None
    stream = _token_stream(path)
    eot = bundled.eos_token_id
    cuts = [-1, *(stream == eot).nonzero().flatten().tolist(), stream.numel()]
    texts = [bundled.decode(stream[a + 1 : b].tolist()) for a, b in zip(cuts[:-1], cuts[1:], strict=True)]
    return [t for t in texts if t.strip()]


# =====================================================================================================
# Modular-addition data for the bundled grokked model (issue 20)
#
# `tl_degeneracy/bundled/modadd-{p}-tokens.safetensors` (made by scripts/train_modadd.py) holds every
# input "a b =" of the
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


def split_digest(is_train: torch.Tensor) -> str:
    """The identity of a train/test split: SHA-256 (hex) of the ``is_train`` mask as bytes 0/1, row ``a·p + b``.

    ``scripts/train_modadd.py`` writes it into the model's ``config.json`` (``task.split.is_train_sha256``),
    and :func:`modadd_data` refuses a token file whose mask has another digest.

    Example::

        split_digest(torch.tensor([True, False]))   # '47dc540c94ceb704a23875c11273e16bb0b8a87aed84de911f2133568115f254'
    """
    return hashlib.sha256(is_train.to(torch.uint8).contiguous().cpu().numpy().tobytes()).hexdigest()


def _modadd_token_file(model: Any, p: int, path: str | os.PathLike | None) -> tuple[Path, str | None, str]:
    """The token file of ``model``, the split digest its folder records (or None), and where it came from.

    With a model: the file named in its folder's ``config.json`` (``task.tokens_file``, written beside the
    folder by scripts/train_modadd.py), unless ``path`` is given; a model whose folder is unknown needs
    ``path``. Without a model: ``path`` or the bundled file.
    """
    if model is None:
        file = Path(path) if path is not None else bundled_data_path(f"modadd-{p}-tokens")
        return file, None, "the bundled token file" if path is None else "path"
    folder = state_dict_source(model)
    if folder is None:
        if path is None:
            raise BadInputError(
                "modadd_data cannot tell which train/test split this model was trained on (it was not loaded "
                "with tld.load_model from a scripts/train_modadd.py folder); load it that way, or pass "
                "path=<the modadd-P-tokens.safetensors written with it>"
            )
        return Path(path), None, "path"
    try:
        task = json.loads((folder / "config.json").read_text()).get("task") or {}
    except (OSError, json.JSONDecodeError, AttributeError):
        task = {}
    digest = (task.get("split") or {}).get("is_train_sha256")
    if path is not None:
        return Path(path), digest, f"the model in '{folder}'"
    return folder.parent / task.get("tokens_file", f"{folder.name}-tokens.safetensors"), digest, \
        f"the model in '{folder}'"


def modadd_data(
    model: Any = None,
    *,
    split: str = "all",
    p: int | None = None,
    path: str | os.PathLike | None = None,
) -> ModAddData:
    """All modular-addition pairs of a model's token file, or its training or held-out share.

    The data follow the model: for a model loaded with :func:`tl_degeneracy.load_model` from a
    ``scripts/train_modadd.py`` folder (the bundled ``modadd-113`` or any other seed's ``--out``), the token
    file is the one written beside that folder (``<out>/modadd-{p}-tokens.safetensors``), so each seed's
    held-out pairs are its own. ``path`` names another file; when the model's ``config.json`` records its split
    (``task.split.is_train_sha256``, see :func:`split_digest`), a file with another split is refused. A model
    whose folder is unknown (built in code, a copy) needs ``path``. Without a model: ``path`` or the bundled
    ``tl_degeneracy/bundled/modadd-{p}-tokens.safetensors``.

    ``p`` defaults to the model's (``d_vocab - 1``: tokens ``0..p-1`` are numbers and ``p`` is "="), or to
    113 without a model. ``split``: ``"all"`` (the p² pairs, row ``a * p + b``), ``"train"`` (the pairs the
    model was trained on) or ``"test"`` (the held-out pairs). With a model, the ids are checked against its
    vocabulary and context. Raises :class:`BadInputError` for an unknown split, a missing file, a file that
    does not fit or one of another split.

    Example::

        model = tld.load_model("modadd-113")
        test = tld.modadd_data(model, split="test")      # the 8938 held-out pairs
        test.tokens[0], test.labels[0]                   # tensor([0, 0, 113]), tensor(0)
        test.accuracy(model)                             # 1.0 for the bundled model
        data = tld.token_batches(model, test.tokens, count="all", outputs="last", batch_size=1024)
        seed1 = tld.load_model("seeds/s1/modadd-113")    # its data: seeds/s1/modadd-113-tokens.safetensors
    """
    if split not in ("all", "train", "test"):
        raise BadInputError(f"split must be 'all', 'train' or 'test', got {split!r}")
    adapter = None if model is None else as_adapter(model)
    if p is None:
        p = 113 if adapter is None else adapter.d_vocab - 1
    file, digest, owner = _modadd_token_file(model, p, path)
    if not file.is_file():
        raise BadInputError(
            f"modular-addition token file '{file}' (for {owner}) not found; make one with "
            f"scripts/train_modadd.py --p {p}, or pass path="
        )
    entries, _ = load_tensors(file, what="modular-addition token file")
    missing = {"tokens", "labels", "is_train"} - set(entries)
    if missing:
        raise BadInputError(f"'{file}' lacks {sorted(missing)}: not a modular-addition token file")
    tokens, labels, is_train = entries["tokens"].long(), entries["labels"].long(), entries["is_train"].bool()
    if tokens.shape != (p * p, 3) or int(tokens[:, 2].min()) != p or int(tokens[:, 2].max()) != p:
        raise BadInputError(f"'{file}' does not hold the {p * p} inputs [a, b, {p}] of p = {p}")
    if digest is not None and split_digest(is_train) != digest:
        raise BadInputError(
            f"'{file}' holds another train/test split than {owner} was trained on (config.json "
            f"task.split.is_train_sha256); pass path= the token file written with that model, or leave path out"
        )
    if adapter is not None:
        _validate(tokens, torch.ones_like(tokens, dtype=torch.bool), adapter.d_vocab, adapter.n_ctx)
    keep = {"all": torch.ones_like(is_train), "train": is_train, "test": ~is_train}[split]
    return ModAddData(tokens[keep], labels[keep], is_train[keep], p, split)
