"""The run folder: the one place that knows where every artifact of ``tl-degeneracy run`` lives.

Stages write, and the report reads, only through :class:`RunFolder`; no other module spells a path inside a
run folder. Layout::

    run.json                     the invocation (command, arguments, versions, machine, timings)
    stats.safetensors/.json      streamed statistics (stats stage); stats.partial.* while it runs
    bases/{site}.{kind}.*        interaction and PCA bases (basis stage)
    ablation/{site}.{kind}.*     ablation curves of those bases (ablate stage)
    sync/{heads|neurons}.layer{l}.*, sync/summary.json      synchronisation (sync stage)
    llc/{selection}/llc.*, llc/scale/, llc/summary.json    LLC estimates and the nβ sweep (llc stage)
    stages/{stage}.json          markers of finished stages (written last)
    plots/*.png, summary.csv/.md, index.md                  the report

Example::

    folder = RunFolder("runs/demo")
    folder.basis("blocks.0.hook_resid_pre", "interaction")   # runs/demo/bases/blocks.0.hook_resid_pre.interaction
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class RunFolder:
    """Paths of a run folder's artifacts (nothing is created by asking)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    def relative(self, path: Path) -> str:
        """``path`` relative to the folder, as recorded in stage markers."""
        return str(Path(path).relative_to(self.root))

    # ---- the invocation and the stage markers ------------------------------------------------------
    @property
    def run_json(self) -> Path:
        return self.root / "run.json"

    @property
    def markers(self) -> Path:
        return self.root / "stages"

    def marker(self, stage: str) -> Path:
        return self.markers / f"{stage}.json"

    # ---- statistics ---------------------------------------------------------------------------------
    @property
    def stats(self) -> Path:
        return self.root / "stats.safetensors"

    @property
    def stats_json(self) -> Path:
        return self.root / "stats.json"

    @property
    def stats_partial(self) -> Path:
        """The checkpoint of an unfinished statistics pass."""
        return self.root / "stats.partial.safetensors"

    # ---- bases --------------------------------------------------------------------------------------
    @property
    def bases(self) -> Path:
        return self.root / "bases"

    def basis(self, site: str, kind: str) -> Path:
        """Where the ``kind`` ("interaction", "pca", ...) basis of ``site`` is saved (``InteractionBasis.save``)."""
        return self.bases / f"{site}.{kind}"

    def saved_bases(self, kind: str) -> dict[str, Path]:
        """site -> tensor file of every saved basis of ``kind``."""
        suffix = f".{kind}.safetensors"
        return {p.name.removesuffix(suffix): p for p in sorted(self.bases.glob(f"*{suffix}"))}

    # ---- ablation curves ------------------------------------------------------------------------------
    @property
    def ablation(self) -> Path:
        return self.root / "ablation"

    def ablation_curve(self, site: str, kind: str) -> Path:
        """Where the ablation curve of the ``kind`` basis of ``site`` is saved (``AblationCurve.save``)."""
        return self.ablation / f"{site}.{kind}"

    def saved_ablation_curves(self, kind: str) -> dict[str, Path]:
        """site -> tensor file of every saved ablation curve of ``kind``."""
        suffix = f".{kind}.safetensors"
        return {p.name.removesuffix(suffix): p for p in sorted(self.ablation.glob(f"*{suffix}"))}

    # ---- synchronisation ----------------------------------------------------------------------------
    @property
    def sync(self) -> Path:
        return self.root / "sync"

    def sync_result(self, kind: str, layer: int | str) -> Path:
        """``kind`` is "heads" or "neurons"."""
        return self.sync / f"{kind}.layer{layer}"

    @property
    def sync_summary(self) -> Path:
        return self.sync / "summary.json"

    # ---- LLC ----------------------------------------------------------------------------------------
    @property
    def llc(self) -> Path:
        return self.root / "llc"

    def llc_result(self, selection: str) -> Path:
        return self.llc / selection

    @property
    def llc_scale(self) -> Path:
        return self.llc / "scale"

    @property
    def llc_summary(self) -> Path:
        return self.llc / "summary.json"

    # ---- report -------------------------------------------------------------------------------------
    @property
    def plots(self) -> Path:
        return self.root / "plots"

    def plot(self, name: str) -> Path:
        return self.plots / f"{name}.png"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def summary_md(self) -> Path:
        return self.root / "summary.md"

    @property
    def index(self) -> Path:
        return self.root / "index.md"
