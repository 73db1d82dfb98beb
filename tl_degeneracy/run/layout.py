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
    manifest.json                every file the run wrote, by stage: the only files a run ever deletes
    .lock                        the PID of the run using the folder (while it runs)
    .staging/{stage}/            a running stage's outputs, moved into place only when it finished

A folder is a run folder when it holds ``run.json`` or ``manifest.json``; a run refuses an existing
non-empty folder that is neither (:meth:`RunFolder.claim`), so ``--out ~/Documents`` never touches a file.

Example::

    folder = RunFolder("runs/demo")
    folder.basis("blocks.0.hook_resid_pre", "interaction")   # runs/demo/bases/blocks.0.hook_resid_pre.interaction
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tl_degeneracy._io import read_json, write_json
from tl_degeneracy.errors import RunFolderError


@dataclass(frozen=True)
class RunFolder:
    """Paths of a run folder's artifacts (nothing is created by asking)."""

    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    def relative(self, path: Path) -> str:
        """``path`` relative to the folder, as recorded in stage markers."""
        return str(Path(path).relative_to(self.root))

    # ---- ownership: manifest, lock, staging ---------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    @property
    def lock_path(self) -> Path:
        return self.root / ".lock"

    def staging(self, stage: str) -> Path:
        """The temporary sibling a running stage writes into (see :meth:`commit`)."""
        return self.root / ".staging" / stage

    def is_run_folder(self) -> bool:
        return self.run_json.is_file() or self.manifest_path.is_file()

    def claim(self) -> None:
        """Create the folder, or accept it when it is empty or a run folder; refuse anyone else's folder."""
        if self.root.exists() and not self.root.is_dir():
            raise RunFolderError(f"--out '{self.root}' is a file, not a folder; choose another --out")
        if self.root.is_dir() and any(self.root.iterdir()) and not self.is_run_folder():
            raise RunFolderError(
                f"'{self.root}' is not empty and is not a tl-degeneracy run folder (no run.json or manifest.json); "
                "a run writes and deletes files in its folder: choose an empty or new --out"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if not self.manifest_path.is_file():
            write_json(self.manifest_path, {"format": "tl_degeneracy.RunManifest", "version": 1, "stages": {}})

    def manifest(self) -> dict[str, list[str]]:
        """stage -> the files (relative paths) it wrote and the run owns."""
        if not self.manifest_path.is_file():
            return {}
        return dict(read_json(self.manifest_path, what="run manifest").get("stages", {}))

    def record(self, stage: str, files: list[str]) -> None:
        """Set the files ``stage`` owns in the manifest."""
        stages = self.manifest()
        stages[stage] = sorted(set(files))
        write_json(self.manifest_path, {"format": "tl_degeneracy.RunManifest", "version": 1, "stages": stages})

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the folder for this process: a second run on it refuses, naming this PID. A lock left by a
        process that no longer runs (kill -9) is taken over."""
        self.root.mkdir(parents=True, exist_ok=True)
        if _lock_owner(self.lock_path) == os.getpid():  # re-entrant: the CLI holds it around run_stages
            yield
            return
        for _ in range(2):
            try:
                fd = os.open(self.lock_path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = _lock_owner(self.lock_path)
                if pid is not None and pid != os.getpid() and _alive(pid):
                    raise RunFolderError(
                        f"'{self.root}' is in use by another run (PID {pid}); wait for it to finish, or stop it "
                        f"(kill {pid}), or choose another --out"
                    ) from None
                self.lock_path.unlink(missing_ok=True)  # stale: its process is gone
                continue
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            break
        else:  # pragma: no cover - another process raced us twice
            raise RunFolderError(f"could not lock '{self.root}': another run is starting on it; try again")
        try:
            yield
        finally:
            if _lock_owner(self.lock_path) == os.getpid():
                self.lock_path.unlink(missing_ok=True)

    def commit(self, stage: str, outputs: list[str]) -> list[str]:
        """Move every file a finished stage wrote in :meth:`staging` into place, then delete the files the
        manifest says the stage wrote before and it did not write again; the manifest then lists the new files
        (returned). ``outputs`` (what the stage's marker lists) must all be among them. Files the run did not
        write are never touched."""
        staging = self.staging(stage)
        written = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file()) \
            if staging.is_dir() else []
        missing = sorted(set(outputs) - set(written))
        if missing:
            raise RunFolderError(f"stage '{stage}' lists outputs it did not write: {missing}")
        old = set(self.manifest().get(stage, []))
        for rel in written:
            dst = self.root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / rel, dst)
        for rel in sorted(old - set(written)):
            (self.root / rel).unlink(missing_ok=True)
        self.record(stage, written)
        self.discard(stage)
        return written

    def progress(self, stage: str) -> Path:
        """Where a running stage keeps the results it finished so far (e.g. one site's ablation curves, one
        LLC estimate), so that a rerun after an interrupt resumes there. Kept after a failure; removed when
        the stage completes (:meth:`discard_progress`)."""
        return self.root / ".progress" / stage

    def discard_progress(self, stage: str) -> None:
        shutil.rmtree(self.progress(stage), ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / ".progress").rmdir()

    def discard(self, stage: str) -> None:
        """Remove a stage's staging folder (after a commit, or a failure)."""
        shutil.rmtree(self.staging(stage), ignore_errors=True)
        with contextlib.suppress(OSError):
            (self.root / ".staging").rmdir()

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

    @property
    def ablation_identity(self) -> Path:
        """The settings and bases an ablation stage in progress was run for (its progress folder only)."""
        return self.ablation / "identity.json"

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

    # ---- interaction graph ------------------------------------------------------------------------
    @property
    def graph(self) -> Path:
        """The graph stage's folder: local bases ``{site}.local.*`` and the graph."""
        return self.root / "graph"

    @property
    def graph_result(self) -> Path:
        """Where the :class:`~tl_degeneracy.InteractionGraph` is saved (``graph.safetensors`` + ``.json``)."""
        return self.graph / "graph.safetensors"

    def edges_needed(self, kind: str) -> Path:
        """Where the graph stage saves the edges needed of the ``kind`` basis (``EdgesNeeded.save``)."""
        return self.graph / f"edges_needed.{kind}"

    def saved_edges_needed(self) -> dict[str, Path]:
        """kind -> tensor file of every saved :class:`~tl_degeneracy.EdgesNeeded`."""
        prefix, suffix = "edges_needed.", ".safetensors"
        return {p.name.removeprefix(prefix).removesuffix(suffix): p
                for p in sorted(self.graph.glob(f"{prefix}*{suffix}"))}

    @property
    def graph_identity(self) -> Path:
        """The settings and statistics a graph stage in progress was run for (its progress folder only)."""
        return self.graph / "identity.json"

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


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def staged(root: Path, stage: str) -> RunFolder:
    """The :class:`RunFolder` rooted at ``stage``'s staging folder of ``root`` (same layout, written first)."""
    return RunFolder(RunFolder(root).staging(stage))


__all__ = ["RunFolder", "staged"]
