"""The one writer and reader of result files: safetensors + JSON, atomic, never pickle.

Every result type (statistics, bases, synchronisation results, LLC results, sweeps, run-folder markers and
summaries) writes through :func:`save_tensors` / :func:`write_json` and reads through :func:`load_tensors` /
:func:`read_json`. A write goes to a temporary file in the target's folder, is flushed to disk (``fsync``)
and renamed into place, so a reader sees the old file or the new one, never half of one.

Format tags: a tensor file carries its JSON metadata under one header key (``tl_degeneracy`` for new files;
readers accept the older keys they name), and that JSON has ``"format"`` (the result type, e.g.
``"tl_degeneracy.InteractionBasis"``) and ``"version"`` (an integer) where the type defines them.

Example::

    save_tensors("out/x.safetensors", {"a": torch.ones(2)}, {"format": "demo", "version": 1})
    tensors, meta = load_tensors("out/x.safetensors")
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import xxhash
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from tl_degeneracy.errors import BadInputError, CorruptFileError, FormatVersionError

#: header key of the JSON metadata in every tensor file written by this library
META_KEY = "tl_degeneracy"
#: header keys of the checksum of the tensors, the container format version and the writer's version
CHECKSUM_KEY = "tl_degeneracy.sha256"
FORMAT_KEY = "tl_degeneracy.io_format"
WRITER_KEY = "tl_degeneracy.writer"
#: version of the container written here (header keys, checksum); a reader refuses a newer one
IO_FORMAT = 1


def _library_version() -> str:
    try:
        return importlib.metadata.version("tl_degeneracy")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source tree without metadata
        return "unknown"


def tensors_checksum(tensors: dict[str, torch.Tensor], *, algorithm: str = "sha256") -> str:
    """``<algorithm>:<hex>`` over every tensor's name, dtype, shape and bytes, in name order (independent of how
    safetensors lays the file out, so it is recomputed from the loaded tensors).

    ``algorithm``: ``"sha256"`` (files' checksums: cryptographic, 0.2–1.5 GB/s on one core) or ``"xxh3_128"``
    (the weights' fingerprint: a 128-bit non-cryptographic hash of the same bytes, ~5 GB/s, so an accidental
    collision has probability ~2⁻¹²⁸; it identifies content, it does not defend against forgery).
    """
    if algorithm == "sha256":
        h: Any = hashlib.sha256()
    elif algorithm == "xxh3_128":
        h = xxhash.xxh3_128()
    else:
        raise BadInputError(f"algorithm must be 'sha256' or 'xxh3_128', got {algorithm!r}")
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself: no bytes copy
    return f"{algorithm}:{h.hexdigest()}"


def check_format(found: Any, supported: int, path: str | os.PathLike, *, writer: str | None = None,
                 what: str = "file") -> None:
    """Refuse a file whose format version ``found`` is newer than ``supported``, naming the version to install."""
    if isinstance(found, int) and found > supported:
        by = f"tl_degeneracy {writer}" if writer else "a newer tl_degeneracy"
        need = f"pip install 'tl_degeneracy>={writer}'" if writer and writer != "unknown" else \
            "upgrade tl_degeneracy (pip install -U tl_degeneracy)"
        raise FormatVersionError(
            f"'{path}' is a {what} of format version {found}, written by {by}; this installation "
            f"(tl_degeneracy {_library_version()}) reads up to version {supported}: {need}"
        )


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` on a temporary sibling of ``path``, fsync it, then rename it onto ``path``.

    The parent folder is created; on any failure (including KeyboardInterrupt) the temporary file is removed
    and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def json_safe(obj: Any) -> Any:
    """Plain JSON values: tensors become lists, tuples lists, NaN/inf floats ``None``."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return json_safe(obj.tolist())
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1, sort_keys: bool = False,
               nan_to_null: bool = True) -> Path:
    """Write ``obj`` as JSON atomically. ``nan_to_null``: NaN/inf become null (strict JSON, for files other
    tools read); otherwise they are written as Python's ``NaN``/``Infinity`` and read back as floats."""
    text = json.dumps(json_safe(obj) if nan_to_null else obj, indent=indent, sort_keys=sort_keys) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def read_json(path: str | os.PathLike, *, what: str = "JSON file") -> Any:
    """Read a JSON file written by :func:`write_json`; a missing, unreadable or corrupted file raises a typed
    error naming it (:class:`BadInputError` / :class:`CorruptFileError`)."""
    p = Path(path)
    if not p.is_file():
        raise BadInputError(f"no {what} at '{p}'")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CorruptFileError(
            f"'{p}' is not a valid {what} (corrupted or truncated: {err}); delete it and recompute it"
        ) from None


def tensor_path(path: str | os.PathLike) -> Path:
    """``path`` with a ``.safetensors`` suffix appended when it has none."""
    p = Path(path)
    return p if p.suffix == ".safetensors" else p.with_name(p.name + ".safetensors")


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None, *,
    sidecar: bool = True, header_key: str = META_KEY, sort_keys: bool = True,
) -> Path:
    """Write ``tensors`` (moved to CPU, contiguous) to ``path`` with ``meta`` as JSON in the header and, with
    ``sidecar``, in a readable ``.json`` beside it; both atomically. Returns the tensor file's path."""
    path = tensor_path(path)
    cpu: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for k, v in tensors.items():
        t = v.detach().cpu().contiguous()
        ptr = t.untyped_storage().data_ptr()
        cpu[k] = t.clone() if ptr in storages else t  # safetensors refuses tensors sharing memory
        storages.add(ptr)
    checksum = tensors_checksum(cpu)
    header = {CHECKSUM_KEY: checksum, FORMAT_KEY: str(IO_FORMAT), WRITER_KEY: _library_version()}
    text = None
    if meta is not None:
        text = json.dumps(meta, indent=1, sort_keys=sort_keys)
        header[header_key] = text
    atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata=header))
    if sidecar and text is not None:
        side = json.dumps({**meta, "sha256": checksum}, indent=1, sort_keys=sort_keys)
        atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(side + "\n"))
    return path


def load_tensors(
    path: str | os.PathLike, *, header_keys: Sequence[str] = (META_KEY,), device: str | torch.device = "cpu",
    what: str = "tl_degeneracy file",
) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """Read a tensor file: its tensors and the JSON metadata under the first of ``header_keys`` present
    (``None`` when the header has none of them). ``path`` may omit the ``.safetensors`` suffix.

    The tensors are checked against the checksum the writer put in the header (files without one, written
    by other tools or older versions, are read unchecked); a file that is not safetensors, truncated,
    bit-flipped or of a newer format raises :class:`CorruptFileError` / :class:`FormatVersionError` naming it.
    """
    p = Path(path)
    if not p.exists() and tensor_path(p).exists():
        p = tensor_path(p)
    if not p.is_file():
        raise BadInputError(f"no {what} at '{p}'")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise CorruptFileError(
            f"'{p}' is not a readable safetensors {what} (truncated, corrupted or another kind of file: "
            f"{' '.join(str(err).split())[:200]}); delete it and recompute it"
        ) from None
    try:
        found = int(header.get(FORMAT_KEY, IO_FORMAT))
    except ValueError:
        found = None
    check_format(found, IO_FORMAT, p, writer=header.get(WRITER_KEY), what=what)
    expected = header.get(CHECKSUM_KEY)
    if expected is not None and tensors_checksum(tensors) != expected:
        raise CorruptFileError(
            f"'{p}' fails its checksum: its tensors changed on disk since they were written (bit flip, partial "
            "copy); delete it and recompute it"
        )
    if str(device) != "cpu":
        tensors = {k: v.to(device) for k, v in tensors.items()}
    for key in header_keys:
        if key in header:
            try:
                return tensors, json.loads(header[key])
            except json.JSONDecodeError as err:
                raise CorruptFileError(f"'{p}': its metadata is not valid JSON ({err}); recompute it") from None
    return tensors, None


def verify_tensor_file(path: str | os.PathLike) -> str | None:
    """Why the tensor file at ``path`` cannot be trusted (missing, unreadable, checksum), or None when it reads
    back as written. What stage markers check before calling a stage up to date."""
    try:
        load_tensors(path)
    except BadInputError as err:
        return str(err)
    return None


def save_result(path: str | os.PathLike, tensors: dict[str, torch.Tensor], info: dict[str, Any], *, fmt: str,
                version: int, nan_to_null: bool = False) -> Path:
    """A result as ``<path>.safetensors`` (its tensors) and ``<path>.json`` (``{"format": fmt, "version":
    version, **info}``), both atomic; :func:`load_result` reads it back. Returns the tensor file's path."""
    t_path = tensor_path(path)
    save_tensors(t_path, tensors, sidecar=False)
    write_json(t_path.with_suffix(".json"), {"format": fmt, "version": version, **info}, indent=2,
               nan_to_null=nan_to_null)
    return t_path


def load_result(path: str | os.PathLike, *, fmt: str, version: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The tensors and the JSON of a result written by :func:`save_result` with the same ``fmt`` and ``version``
    (else :class:`BadInputError` naming the file)."""
    name = fmt.split(".")[-1]
    t_path = tensor_path(path)
    json_path = t_path.with_suffix(".json")
    if not t_path.exists() or not json_path.exists():
        raise BadInputError(f"expected {t_path} and {json_path}, written by {name}.save")
    info = read_json(json_path)
    if info.get("format") != fmt or info.get("version") != version:
        raise BadInputError(f"{json_path} is not a{'n' if name[0] in 'AEIOU' else ''} {name} file of version {version}")
    tensors, _ = load_tensors(t_path, what=f"{name} tensor file")
    return tensors, info

