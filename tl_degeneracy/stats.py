"""Streamed statistics: additive float64 totals per site, saved as safetensors + JSON (SPEC §1, §2).

A :class:`Stats` is a dict of named float64/int64 tensors that are all *sums over counted tokens* (so totals
from different batches, passes, processes or machines add exactly) plus JSON-ready metadata.

Names used (``{site}`` is the hook name):

- ``act/{site}/n`` (int64 scalar) count, ``act/{site}/sum`` (d) Σ a_t, ``act/{site}/outer`` (d×d) Σ a_t a_tᵀ
- ``jac/{site}/n`` (int64 scalar) tokens, ``jac/{site}/outer`` (d×d) Σ_t g_t g_tᵀ summed over probes / K
- other analyses (synchronisation) add their own prefixes.

Example::

    stats.gram("blocks.0.hook_resid_pre")            # centred Gram G_c = S/n − μμᵀ, float64
    stats.save("run/stats.safetensors"); tld.Stats.load("run/stats.safetensors")
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors import safe_open
from safetensors.torch import save_file

from tl_degeneracy.errors import BadInputError, IncompatibleStatsError

_META_KEY = "tl_degeneracy"
# metadata entries that must agree for totals to be added (merge) or continued (resume)
_IDENTITY_KEYS = ("model", "sites", "jacobian_metric", "head_sync", "neuron_sync", "precision", "format")
FORMAT_VERSION = 1


class Stats:
    """Per-site streamed totals. Build with :func:`tl_degeneracy.collect`; read with the accessors below."""

    def __init__(self, tensors: dict[str, torch.Tensor] | None = None, meta: dict[str, Any] | None = None):
        self.tensors: dict[str, torch.Tensor] = dict(tensors or {})
        self.meta: dict[str, Any] = {"format": FORMAT_VERSION, **(meta or {})}

    # ---- accessors ------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.meta.get("sites", []))

    def _get(self, key: str, site: str, what: str) -> torch.Tensor:
        if key not in self.tensors:
            if site not in self.sites:
                raise BadInputError(f"no statistics for site '{site}'; collected sites: {self.sites}")
            raise BadInputError(f"no {what} for site '{site}' in these statistics")
        return self.tensors[key]

    def count(self, site: str) -> int:
        """n: counted tokens at the site."""
        return int(self._get(f"act/{site}/n", site, "activation count"))

    def mean(self, site: str) -> Float[torch.Tensor, " d"]:
        """μ = s / n."""
        return self._get(f"act/{site}/sum", site, "activation sums") / max(self.count(site), 1)

    def gram(self, site: str, *, centered: bool = True) -> Float[torch.Tensor, "d d"]:
        """G = S/n (uncentred) or the covariance G_c = S/n − μμᵀ (``centered=True``, the default)."""
        n = max(self.count(site), 1)
        g = self._get(f"act/{site}/outer", site, "activation Gram") / n
        if centered:
            mu = self.mean(site)
            g = g - torch.outer(mu, mu)
        return g

    def jacobian_gram(self, site: str) -> Float[torch.Tensor, "d d"]:
        """M = (1/N) Σ_t J_tᵀ F J_t (SPEC §2); needs ``collect(..., jacobian="kl" | "mse")``."""
        if f"jac/{site}/outer" not in self.tensors and site in self.sites:
            raise BadInputError(
                f"no Jacobian statistics for site '{site}': collect with jacobian='kl' or jacobian='mse'"
            )
        total = self._get(f"jac/{site}/outer", site, "Jacobian statistics")
        return total / max(int(self._get(f"jac/{site}/n", site, "Jacobian count")), 1)

    @property
    def n_tokens(self) -> int:
        return int(self.meta.get("n_tokens", 0))

    # ---- arithmetic -----------------------------------------------------------------------------
    def add_(self, increments: dict[str, torch.Tensor]) -> None:
        """Add per-batch increments into the totals (float64 / int64), creating entries on first use.

        Totals stay on the device they were created on (the model's, during :func:`collect`), so a GPU run
        never copies d×d increments to the host per batch.
        """
        for key, inc in increments.items():
            inc = inc.detach().to(torch.float64 if inc.is_floating_point() else torch.int64)
            if key in self.tensors:
                self.tensors[key] += inc.to(self.tensors[key].device)
            else:
                self.tensors[key] = inc.clone()

    def to(self, device: str | torch.device) -> Stats:
        """Move the totals to ``device`` in place (returns self)."""
        self.tensors = {k: v.to(device) for k, v in self.tensors.items()}
        return self

    def _identity(self, key: str) -> Any:
        if key == "jacobian_metric":  # seeds, K and estimator may differ: each run's M is unbiased per token
            return (self.meta.get("jacobian") or {}).get("metric")
        return self.meta.get(key)

    def _check_compatible(self, other: Stats, action: str) -> None:
        for key in _IDENTITY_KEYS:
            if self._identity(key) != other._identity(key):
                raise IncompatibleStatsError(
                    f"cannot {action} statistics with a different '{key}': "
                    f"{json.dumps(self._identity(key))[:300]} vs {json.dumps(other._identity(key))[:300]}"
                )
        if set(self.tensors) != set(other.tensors):
            raise IncompatibleStatsError(f"cannot {action}: the two hold different statistics")

    def merge(self, other: Stats) -> Stats:
        """A new Stats with the totals of both (same model, sites and settings, else IncompatibleStatsError).

        Jacobian statistics merge when their metric agrees: runs with other seeds, probe counts or estimators
        each give an unbiased M per token, so their totals add (``meta["merged_from"]`` keeps both settings).
        """
        self._check_compatible(other, "merge")
        out = Stats({k: v.clone() for k, v in self.tensors.items()}, copy.deepcopy(self.meta))
        out.add_(other.tensors)
        out.meta["n_tokens"] = self.n_tokens + other.n_tokens
        out.meta["merged_from"] = [_data_summary(self), _data_summary(other)]
        return out

    # ---- storage --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, metadata JSON in its header) and a readable ``.json`` sidecar.

        Both are written to temporary files and renamed into place, so an interrupted save never leaves a
        corrupt or half-written result.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_json = json.dumps(self.meta, indent=1, sort_keys=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.tensors.items()}
        _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: meta_json}))
        _atomic_write(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(meta_json + "\n"))
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        path = Path(path)
        if not path.exists() and path.with_suffix(".safetensors").exists():
            path = path.with_suffix(".safetensors")
        if not path.exists():
            raise BadInputError(f"no statistics file at '{path}'")
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            if _META_KEY not in header:
                raise BadInputError(f"'{path}' is not a tl_degeneracy statistics file")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors, json.loads(header[_META_KEY]))

    def __repr__(self) -> str:
        return f"Stats(sites={self.sites}, n_tokens={self.n_tokens}, entries={len(self.tensors)})"


def _data_summary(stats: Stats) -> dict[str, Any]:
    return {"n_tokens": stats.n_tokens, "data": stats.meta.get("data"), "jacobian": stats.meta.get("jacobian")}


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
