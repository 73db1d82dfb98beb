"""Streamed statistics: additive float64 totals per site, saved as safetensors + JSON (SPEC §1, §2).

A :class:`Stats` is a dict of named float64/int64 tensors that are all *sums over counted tokens* (so totals
from different batches, passes, processes or machines add exactly) plus JSON-ready metadata.

Names used (``{site}`` is the hook name):

- ``act/{site}/n`` (int64 scalar) count, ``act/{site}/sum`` (d) Σ a_t, ``act/{site}/outer`` (d×d) Σ a_t a_tᵀ
- ``jac/{site}/n`` (int64 scalar) tokens, ``jac/{site}/outer`` (d×d) Σ_t g_t g_tᵀ summed over probes / K
- ``hsync/{l}/...``, ``nsync/{l}/...``: head and neuron synchronisation sums
  (:mod:`tl_degeneracy.collection.components`), read with :meth:`Stats.sync_sums`.

Example::

    stats.gram("blocks.0.hook_resid_pre")            # centred Gram G_c = S/n − μμᵀ, float64
    stats.save("run/stats.safetensors"); tld.Stats.load("run/stats.safetensors")
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float

from tl_degeneracy._io import META_KEY, check_format, load_tensors, save_tensors
from tl_degeneracy.errors import BadInputError, IncompatibleStatsError

# metadata entries that must agree for totals to be added (merge) or continued (resume)
_IDENTITY_KEYS = ("model", "sites", "jacobian_metric", "head_sync", "neuron_sync", "precision", "format")
FORMAT_VERSION = 1
#: elements per chunk of the in-place float32 → float64 additions on the CPU (512 KiB of float64)
ADD_CHUNK = 1 << 16


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

    #: synchronisation kinds -> (tensor prefix, collect() flag, component key in ``meta["components"]``)
    _SYNC = {"head": ("hsync", "head_sync", "HeadSyncSums"), "neuron": ("nsync", "neuron_sync", "NeuronSyncSums")}

    def sync_layers(self, kind: str) -> list[int]:
        """Layers with synchronisation sums of ``kind`` (``"head"`` or ``"neuron"``), ascending."""
        prefix = self._SYNC[kind][0]
        return sorted({int(k.split("/")[1]) for k in self.tensors if k.startswith(prefix + "/")})

    def sync_sums(self, kind: str, layer: int, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        """The synchronisation sums ``{prefix}/{layer}/{key}`` of ``kind`` (``"head"`` / ``"neuron"``) on the
        CPU, or a :class:`BadInputError` saying how to collect them."""
        prefix, flag, _ = self._SYNC[kind]
        missing = [k for k in keys if f"{prefix}/{layer}/{k}" not in self.tensors]
        if missing:
            have = self.sync_layers(kind)
            if not have:
                raise BadInputError(f"these statistics hold no {prefix} sums: collect with {flag}=True")
            raise BadInputError(
                f"no {prefix} sums for layer {layer}: collected layers are {have}; collect with {flag}=True and "
                f"sync_layers including {layer}"
            )
        return {k: self.tensors[f"{prefix}/{layer}/{k}"].cpu() for k in keys}

    def sync_settings(self, kind: str) -> dict[str, Any]:
        """The settings the synchronisation sums of ``kind`` were collected with (e.g. ``gate_at_zero``)."""
        return dict(self.meta.get("components", {}).get(self._SYNC[kind][2], {}))

    @property
    def gate_at_zero(self) -> float:
        """The neuron gate r(0) the neuron synchronisation sums used (NaN when unknown)."""
        return float(self.sync_settings("neuron").get("gate_at_zero", math.nan))

    @property
    def n_tokens(self) -> int:
        return int(self.meta.get("n_tokens", 0))

    # ---- arithmetic -----------------------------------------------------------------------------
    def add_(self, increments: dict[str, torch.Tensor]) -> None:
        """Add per-batch increments into the totals (float64 / int64), creating entries on first use.

        Totals stay on the device they were created on (the model's, during :func:`collect`), so a GPU run
        never copies d×d increments to the host per batch.

        In place and without a full float64 temporary: each element of a float32 increment is converted to
        float64 exactly (every float32 is a float64) before the float64 addition, so the totals are bit-identical
        to converting first. On the CPU a mixed-dtype ``add_`` would still cast the whole increment into a fresh
        float64 matrix first (d×d per statistic and batch: page faults and memory), so it runs over chunks of
        :data:`ADD_CHUNK` elements, whose casts stay in cache; CUDA casts inside the kernel.
        """
        for key, inc in increments.items():
            inc = inc.detach()
            dtype = torch.float64 if inc.is_floating_point() else torch.int64
            if key not in self.tensors:
                self.tensors[key] = inc.to(dtype, copy=True, memory_format=torch.contiguous_format)
                continue
            total = self.tensors[key]
            inc = inc.to(total.device)
            if (total.device.type != "cpu" or inc.dtype == total.dtype or inc.shape != total.shape
                    or not total.is_contiguous()):
                total.add_(inc)
                continue
            flat_total, flat_inc = total.view(-1), inc.reshape(-1)
            for start in range(0, flat_total.numel(), ADD_CHUNK):
                flat_total[start:start + ADD_CHUNK].add_(flat_inc[start:start + ADD_CHUNK])

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
        shared = set(self._draws()) & set(other._draws())
        if other is self or shared:
            raise IncompatibleStatsError(
                "cannot merge: both statistics are the same collection (same token data "
                f"{sorted(shared or self._draws())[0][:19]}... and the same probe seed), so it would count twice; "
                "merge statistics of other data, or Jacobian runs with another seed"
            )
        out = Stats({k: v.clone() for k, v in self.tensors.items()}, copy.deepcopy(self.meta))
        out.add_(other.tensors)
        out.meta["n_tokens"] = self.n_tokens + other.n_tokens
        out.meta["merged_from"] = [_data_summary(self), _data_summary(other)]
        out.meta["draws"] = [*self._draws(), *other._draws()]
        return out

    def _draws(self) -> list[str]:
        """``{data fingerprint}|seed{s}`` of each collection merged into these totals: one collection twice
        is the same sample counted twice (other seeds on the same data are new probe draws)."""
        if "draws" in self.meta:
            return list(self.meta["draws"])
        fp = (self.meta.get("data") or {}).get("fingerprint")
        return [f"{fp}|seed{(self.meta.get('jacobian') or {}).get('seed')}"] if fp else []

    # ---- storage --------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path`` (safetensors, metadata JSON in its header) and a readable ``.json`` sidecar.

        Both are written to temporary files and renamed into place, so an interrupted save never leaves a
        corrupt or half-written result.
        """
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path.with_suffix(path.suffix + ".safetensors") if path.suffix else path.with_suffix(".safetensors")
        return save_tensors(path, self.tensors, self.meta)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Stats:
        path = Path(path)
        if not path.exists() and path.with_suffix(".safetensors").exists():
            path = path.with_suffix(".safetensors")
        tensors, meta = load_tensors(path, header_keys=(META_KEY,), what="statistics file")
        if meta is None:
            raise BadInputError(f"'{path}' is not a tl_degeneracy statistics file")
        check_format(meta.get("format"), FORMAT_VERSION, path, writer=meta.get("library_version"),
                     what="statistics file")
        return cls(tensors, meta)

    def __repr__(self) -> str:
        return f"Stats(sites={self.sites}, n_tokens={self.n_tokens}, entries={len(self.tensors)})"


def _data_summary(stats: Stats) -> dict[str, Any]:
    return {"n_tokens": stats.n_tokens, "data": stats.meta.get("data"), "jacobian": stats.meta.get("jacobian")}

