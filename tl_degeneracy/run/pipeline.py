"""The stages of ``tl-degeneracy run``: independent steps that read and write files in one run folder.

Each stage is a :class:`Stage` in the registry :data:`STAGES`, run in this order:

- ``stats``: one streaming pass of :func:`tl_degeneracy.collect` (activation, output-Jacobian, head and
  neuron synchronisation sums) → ``stats.safetensors``; checkpointed to ``stats.partial.safetensors`` so an
  interrupted pass resumes where it stopped;
- ``basis``: interaction and PCA bases of every site → ``bases/``;
- ``ablate``: ablation curves (KL against kept directions, measured and predicted) of the interaction and
  PCA bases at every site, on a token budget of its own (``ablate_n_tokens``) → ``ablation/``;
- ``sync``: head and neuron synchronisation per layer → ``sync/``;
- ``llc``: behavioral LLC of the whole model and of each layer, and an nβ sweep for λ(ε) → ``llc/``;
- ``report``: tables, plots and ``index.md`` from the saved results (:func:`tl_degeneracy.run.report.write_report`).

A finished stage leaves a marker ``stages/{name}.json`` (written last) with the settings its outputs depend
on and the ids of the upstream outputs it read. Running a stage again skips it when the marker and its
outputs exist with the same settings and inputs; recomputes it when an upstream stage was recomputed since;
and refuses, naming the difference, when the settings changed (``force=True`` recomputes). So an interrupted
run resumes by running the same command again, and scripted sweeps can run one stage alone::

    cfg = RunConfig(layers=(0, 1), n_tokens=2048)
    run_stages(cfg, "runs/demo", ["stats"])
    run_stages(cfg, "runs/demo", ["basis"])        # reads runs/demo/stats.safetensors

Stages only call the public API (``tl_degeneracy.*``); a stage whose analysis this installation lacks says
so (:meth:`Stage.unavailable`) instead of running.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

import tl_degeneracy as tld
from tl_degeneracy._io import json_safe, read_json, tensor_path, verify_tensor_file, write_json
from tl_degeneracy.analysis.basis import DEFAULT_RTOL
from tl_degeneracy.collection.distributed import local_only
from tl_degeneracy.errors import BadInputError, IncompatibleStatsError
from tl_degeneracy.llc.diagnostics import needs_longer_chains
from tl_degeneracy.run.layout import RunFolder, staged
from tl_degeneracy.sites import check_layers, site_dim

__all__ = [
    "RunConfig",
    "RunContext",
    "STAGES",
    "Stage",
    "StageSettingsError",
    "default_stages",
    "parse_layers",
    "run_stages",
]

class StageSettingsError(BadInputError):
    """A finished stage's outputs were made with other settings than the ones asked for now."""


# ---------------------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunConfig:
    """Everything a run depends on; each stage reads the fields it needs (see :meth:`Stage.settings`).

    ``model``/``data`` ``None`` mean the bundled model (``tld.bundled_model_path()``) and its held-out token
    file (``tld.bundled_data_path()``). ``layers`` ``None`` means every layer. ``llc_params`` are parameter
    selections (SPEC §5); ``{l}`` expands to every analysed layer.

    The non-LLC defaults are sized for a look at the bundled model on a laptop CPU in a few minutes.

    The SGLD defaults were chosen with :func:`tl_degeneracy.calibrate_llc`'s cells on the bundled model and
    the data this run samples (2048 tokens in batches of 4 × 128), so that every estimate of the default stage
    is ``converged`` by the library's own verdict (grid, traces and timings in benchmarks/RESULTS.md; whole
    model at these defaults: λ̂ = 586.9 ± 2.7 (s.e.), MALA acceptance 0.96–0.98 per chain, R̂ 1.009, bulk ESS
    2980):

    - **MALA acceptance ≥ 0.9 binds, through step·γ.** The localization gives each of the 1.09·10⁶ sampled
      parameters curvature γ, and MALA's acceptance sees both SGLD's discretisation error on those directions
      (grows with step·γ) and how far their spread still is from equilibrium (decays like e^(−step·γ·t)). On
      the model at γ = 5000: step 2·10⁻⁵ (the old default) 0.65, 6·10⁻⁶ 0.61, 3·10⁻⁶ 0.25 (too slow to
      equilibrate in a 50-step burn-in), 2·10⁻⁶ with 300 burn-in 0.93. The old default's λ̂ was also ~30%
      above the one at 6·10⁻⁶ (step-size bias). For one layer (≈ 2·10⁵ parameters) step·γ = 0.02 still gave
      0.88, so step·γ = 0.01 it is.
    - **γ = 5000, not weaker.** At γ = 1000 (step 6·10⁻⁶) the trace was still rising after 200 steps (R̂ 1.48,
      ESS 8): the weakly curved directions equilibrate in ~1/(step·γ) steps, so a weaker localization needs
      proportionally longer chains.
    - **1000 steps, 500 burn-in.** At step·γ = 0.01 the whole-model trace levels off after ~275 steps. The
      flat directions relax in 2/(step·γ) = 200 steps, and the small per-layer λ̂ of the last layers (13–15)
      follow them: 200 draws per chain (the old 500/300) gave R̂ 1.15–1.17 for blocks.2/blocks.3, 500 draws
      R̂ 1.06/1.18. The stage samples an estimate that fails only on mixing again with twice the steps
      (``llc_max_steps``, default 4 × ``llc_steps``): on the bundled model blocks.2 and blocks.3 take 2000 steps.
    - **The nβ sweep keeps step·γ.** Its runs at nβ/3 and 3nβ scale the step by nβ₀/nβ and γ by nβ/nβ₀, so
      every run has the base run's acceptance and equilibration time (both converged).
    - **Batches of 4 sequences.** One sequence per step cost 2.4× less but heated the chains (λ̂ 1340 vs 800
      at the old step), so 4 is the smallest batch kept.

    Cost: 7 estimates × (1000 steps + 50 MALA checks) × 4 chains batched, plus 2 × 2000 steps for blocks.2 and
    blocks.3 (late layers: the backward stops early, so they are the cheapest) — about 25 minutes of one CPU
    core; see benchmarks/RESULTS.md for measured times. For another model, run ``tl-degeneracy calibrate`` (or
    ``run --llc-calibrate``).
    """

    model: str | None = None
    data: str | None = None
    layers: tuple[int, ...] | None = None
    sites: tuple[str, ...] = ("resid_pre", "mlp_post")
    jacobian: str | None = "kl"
    n_probes: int = 4
    precision: str = "accurate"
    n_tokens: int = 8192
    seq_len: int = 128
    batch_size: int = 16
    sync: bool = True
    rtol: float = DEFAULT_RTOL
    atol: float = 0.0
    sync_measure: str = "normalized_distance"
    tau_heads: float = 0.05
    tau_neurons: float = 0.05
    ablate_n_tokens: int = 1024
    ablate_batch_size: int = 8
    ablate_tolerance: float = 0.01
    llc_params: tuple[str, ...] = ("all", "blocks.{l}")
    llc_nbeta: float = 1e4
    llc_nbetas: tuple[float, ...] = ()
    llc_step_size: float = 2e-6
    llc_localization: float = 5000.0
    llc_chains: int = 4
    llc_steps: int = 1000
    llc_burnin: int = 500
    llc_max_steps: int | None = None
    llc_n_tokens: int = 2048
    llc_batch_size: int = 4
    graph: bool | None = None
    graph_n_tokens: int = 512
    graph_eps: float | None = None
    seed: int = 0
    device: str = "auto"

    def to_json(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def parse_layers(text: str) -> tuple[int, ...] | None:
    """``"all"`` → None; ``"0-3"`` → (0, 1, 2, 3); ``"0,2,5"`` and mixtures like ``"0-2,5"``; sorted, unique."""
    text = text.strip()
    if text == "all":
        return None
    layers: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise BadInputError(f"invalid layers '{text}': use 'all', a range '0-3' or a list '0,2,5'")
        first, last = int(lo), int(hi) if sep else int(lo)
        if last < first:
            raise BadInputError(f"invalid layer range '{part}': the end is below the start")
        layers.update(range(first, last + 1))
    return tuple(sorted(layers))


def resolve_device(name: str) -> str:
    """``"auto"`` → ``"cuda"`` when a GPU is visible, else ``"cpu"``; a CUDA device without CUDA fails early."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise BadInputError(f"device '{name}' asked for, but no CUDA device is available; use --device cpu")
    try:
        torch.device(name)
    except RuntimeError as err:
        raise BadInputError(f"unknown device '{name}': {err}") from err
    return name


def model_identity(model: str | None) -> str:
    """The model as recorded in stage settings: a resolved folder path, or the hub name as given."""
    if model is None:
        return str(tld.bundled_model_path().resolve())
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else model


def data_identity(data: str | None) -> str:
    if data is None:
        return str(tld.bundled_data_path().resolve())
    path = Path(data).expanduser()
    return str(path.resolve()) if path.exists() else data


def content_fingerprint(identity: str) -> str | None:
    """A hash of the bytes behind a model or data path (every file of a folder, by relative path), so a rerun
    sees that the weights or data behind the same path changed; None for a hub name (no local files)."""
    path = Path(identity)
    if not path.exists():
        return None
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    key = tuple((str(p), p.stat().st_size, p.stat().st_mtime_ns, p.stat().st_ino) for p in files)
    return _hash_files(key)


@functools.lru_cache(maxsize=16)
def _hash_files(key: tuple[tuple[str, int, int, int], ...]) -> str:
    """sha256 over the files' relative names and bytes (cached per process on path, size, mtime and inode)."""
    h = hashlib.sha256()
    root = Path(os.path.commonpath([k[0] for k in key])) if len(key) > 1 else Path(key[0][0]).parent
    for name, *_ in key:
        h.update(str(Path(name).relative_to(root)).encode() + b"\0")
        with open(name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return "sha256:" + h.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# the context shared by the stages of one invocation
# ---------------------------------------------------------------------------------------------------------
def _log_stderr(message: str) -> None:
    print(f"[tl-degeneracy] {message}", file=sys.stderr, flush=True)


@dataclass
class RunContext:
    """The run folder, the configuration, and the model (loaded once, when a stage first needs it)."""

    config: RunConfig
    out: Path
    progress: bool = True
    log: Callable[[str], None] = _log_stderr
    timings: dict[str, float] = field(default_factory=dict)
    _data: dict[tuple[int | None, int], tld.TokenBatches] = field(default_factory=dict, repr=False)

    #: --force: recompute, and discard a partial statistics checkpoint instead of resuming it
    force: bool = False
    #: the stage running now (its outputs go to :attr:`target`)
    stage: str | None = None

    @property
    def folder(self) -> RunFolder:
        """Where every artifact of the run lives (what stages read)."""
        return RunFolder(self.out)

    @property
    def target(self) -> RunFolder:
        """Where the running stage writes: its staging folder, moved into place when it finishes."""
        return staged(self.out, self.stage) if self.stage is not None else self.folder

    @property
    def progress_folder(self) -> RunFolder:
        """Where the running stage keeps finished parts for a resume after an interrupt (same layout); discarded
        when the stage completes, and by ``--force``."""
        if self.stage is None:
            raise RuntimeError("progress_folder is only defined while a stage runs")
        return RunFolder(self.folder.progress(self.stage))

    @cached_property
    def device(self) -> str:
        return resolve_device(self.config.device)

    @cached_property
    def model(self) -> Any:
        name = str(tld.bundled_model_path()) if self.config.model is None else self.config.model
        self.log(f"loading model {name} on {self.device}")
        t0 = time.perf_counter()
        try:
            model = tld.load_model(name, device=self.device)
        except (tld.TLDegeneracyError, KeyboardInterrupt):
            raise
        except Exception as err:  # a truncated or corrupted model file: name it, no traceback
            raise BadInputError(
                f"cannot load the model '{name}': {type(err).__name__}: {' '.join(str(err).split())[:300]}; "
                "check that its files are complete (re-download or re-save it)"
            ) from err
        self.timings["load_model"] = time.perf_counter() - t0
        return model

    @cached_property
    def layers(self) -> list[int]:
        """The analysed layers, checked against the model."""
        if self.config.layers is None:
            return list(range(tld.ModelAdapter(self.model).n_layers))
        return check_layers(self.model, self.config.layers, sort=False)

    def data(self, *, n_tokens: int | None, batch_size: int) -> tld.TokenBatches:
        """Token batches from ``config.data`` (built once per ``(n_tokens, batch_size)``)."""
        key = (n_tokens, batch_size)
        if key not in self._data:
            c = self.config
            self._data[key] = tld.load_data(self.model, c.data, seq_len=c.seq_len, batch_size=batch_size,
                                        n_tokens=n_tokens)
        return self._data[key]


# ---------------------------------------------------------------------------------------------------------
# stage registry
# ---------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stage:
    """One step of a run.

    Attributes:
        name: the name used by ``--stages``.
        help: one line for ``--help``.
        run: ``run(ctx) -> (outputs, summary)``: writes files under ``ctx.out``; returns their paths
            (relative to the folder) and a JSON-ready summary kept in the marker.
        settings: ``settings(config) -> dict``: the configuration fields the outputs depend on.
        after: stages whose outputs it reads (they must have finished, in this or an earlier invocation).
        requires: public ``tl_degeneracy`` names it calls; missing ones make it unavailable.
        always: run every time (no marker): for the report, which is cheap and reflects every other stage.
        check: ``check(ctx)`` raises on options that would fail the stage; runs before any stage does.
    """

    name: str
    help: str
    run: Callable[[RunContext], tuple[list[str], dict[str, Any]]]
    settings: Callable[[RunConfig], dict[str, Any]]
    after: tuple[str, ...] = ()
    requires: tuple[str, ...] = ()
    always: bool = False
    check: Callable[[RunContext], None] | None = None

    def unavailable(self) -> str | None:
        """Why this installation cannot run the stage (None when it can)."""
        missing = [n for n in self.requires if not hasattr(tld, n)]
        if missing:
            return (f"stage '{self.name}' is not available: this installation of tl_degeneracy "
                    f"{tld.__version__} has no {', '.join('tld.' + n for n in missing)}")
        return None


#: name -> stage, in run order
STAGES: dict[str, Stage] = {}


def register(stage: Stage) -> Stage:
    """Add a stage to :data:`STAGES` (run order is registration order)."""
    if stage.name in STAGES:
        raise ValueError(f"stage '{stage.name}' is already registered")
    STAGES[stage.name] = stage
    return stage


def default_stages(config: RunConfig, *, llc: bool = True) -> list[str]:
    """Every registered stage the configuration asks for: no ``basis`` without a Jacobian, no ``sync``
    without synchronisation sums, no ``llc`` when switched off."""
    skip = {"basis", "ablate"} if config.jacobian is None else set()
    if not wants_graph(config):
        skip.add("graph")
    if not config.sync:
        skip.add("sync")
    if not llc:
        skip.add("llc")
    return [name for name in STAGES if name not in skip]


def wants_graph(config: RunConfig) -> bool:
    """The ``graph`` stage runs by default only on the bundled model (``graph=None``: a small token budget
    there; on a large model one pass per residual site pair is long); ``graph=True/False`` forces it. It needs
    Jacobian statistics and resid_pre sites at two or more layers."""
    if config.jacobian is None or "resid_pre" not in config.sites or (
            config.layers is not None and len(set(config.layers)) < 2):
        return False
    return config.model is None if config.graph is None else bool(config.graph)


# ---------------------------------------------------------------------------------------------------------
# markers
# ---------------------------------------------------------------------------------------------------------
def _marker_path(out: Path, name: str) -> Path:
    return RunFolder(out).marker(name)


def read_marker(out: Path, name: str, *, log: Callable[[str], None] | None = None) -> dict[str, Any] | None:
    """The marker of a finished stage, or None when it has not finished, or an output is gone or fails its
    check (tensor files against their checksum, JSON files parse): such a stage runs again (``log`` says why)."""
    path = _marker_path(out, name)
    if not path.is_file():
        return None
    try:
        marker = read_json(path, what="stage marker")
    except BadInputError as err:
        if log:
            log(f"{name}: {err}; it runs again")
        return None
    for rel in marker.get("outputs", []):
        p = out / rel
        why = None if p.is_file() else f"its output '{p}' is missing"
        if why is None and p.suffix == ".safetensors":
            st = p.stat()
            why = _verified(str(p), st.st_size, st.st_mtime_ns, st.st_ino)
        elif why is None and p.suffix == ".json":
            try:
                read_json(p)
            except BadInputError as err:
                why = str(err)
        if why is not None:
            if log:
                log(f"{name}: {why}; it runs again")
            return None
    return marker


@functools.lru_cache(maxsize=256)
def _verified(path: str, size: int, mtime_ns: int, inode: int) -> str | None:
    """:func:`verify_tensor_file`, once per process for a file that has not changed (a plan reads a marker's
    outputs several times; the statistics of a large model are gigabytes)."""
    return verify_tensor_file(path)


def _differences(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    return "; ".join(f"{k}: {old.get(k)!r} → {new.get(k)!r}" for k in keys if old.get(k) != new.get(k))


# ---------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------
def run_stages(config: RunConfig, out: str | os.PathLike, stages: Sequence[str], *, force: bool = False,
               progress: bool = True, log: Callable[[str], None] = _log_stderr,
               explicit: bool = True) -> dict[str, dict[str, Any]]:
    """Run the named stages in registry order in the folder ``out``; returns ``{stage: status}``.

    First a plan, before anything runs: each stage is skipped (its outputs exist with the same settings and
    inputs), recomputed (``force``, never finished, or an upstream stage runs or ran since), or refused
    (other settings: :class:`StageSettingsError`); then every stage that will run checks its options
    (:attr:`Stage.check`), so a bad option fails in seconds, not after the statistics pass. Then the stages run.

    A status has ``status`` (``"ran"``, ``"skipped"`` (up to date), ``"unavailable"``) and ``seconds``.
    ``explicit=False`` (the default stage list) turns an unavailable stage into a warning instead of an error.
    Raises :class:`BadInputError` when a stage's inputs are missing.
    """
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise BadInputError(f"unknown stages {unknown}; choose from {', '.join(STAGES)}")
    out = Path(out)
    ctx = RunContext(config, out, progress=progress, log=log, force=force)
    status: dict[str, dict[str, Any]] = {}
    to_run: list[Stage] = []
    for name in (s for s in STAGES if s in stages):
        stage = STAGES[name]
        why = stage.unavailable()
        if why is not None:
            if explicit:
                raise BadInputError(why)
            log(f"warning: {why}; skipping it")
            status[name] = {"status": "unavailable", "reason": why}
            continue
        rerun_deps = [d for d in stage.after if any(s.name == d for s in to_run)]
        for dep in stage.after:
            if dep not in rerun_deps and read_marker(out, dep) is None:
                raise BadInputError(
                    f"stage '{name}' reads the outputs of stage '{dep}', which has not finished in '{out}'; "
                    f"run `tl-degeneracy run --stages {dep} --out {out}` first (same model and data options)"
                )
        marker = None if stage.always else read_marker(out, name, log=log)
        if marker is None or force:
            to_run.append(stage)
            continue
        settings = json_safe(stage.settings(config))
        if json_safe(marker["settings"]) != settings:
            raise StageSettingsError(
                f"stage '{name}' in '{out}' was run with other settings "
                f"({_differences(marker['settings'], settings)}); pass --force to recompute it, or use another --out"
            )
        current = {dep: (read_marker(out, dep) or {}).get("id") for dep in stage.after}
        if rerun_deps or marker.get("inputs") != current:
            log(f"{name}: its inputs are recomputed since it ran; it runs again")
            to_run.append(stage)
            continue
        log(f"{name}: up to date in {out}, skipped")
        status[name] = {"status": "skipped", "seconds": 0.0}

    for stage in to_run:
        if stage.check is not None:
            stage.check(ctx)
    if to_run:
        log("plan: " + "; ".join(f"{s.name}: {_cost(s.name, config)}" for s in to_run))
    folder = RunFolder(out)
    folder.claim()
    with folder.lock():
        for stage in to_run:
            status[stage.name] = _run_one(stage, ctx)
    if "load_model" in ctx.timings:
        status["_load_model"] = {"status": "ran", "seconds": ctx.timings["load_model"]}
    return status


def _cost(name: str, c: RunConfig) -> str:
    """What a stage costs, in model passes (the cost model of ECOSYSTEM.md): said before it runs."""
    if name == "stats":
        batches = math.ceil(c.n_tokens / max(c.seq_len - 1, 1) / c.batch_size)
        bwd = c.n_probes if c.jacobian else 0
        return (f"~{batches} batches of {c.batch_size}×{c.seq_len} tokens, 1 forward and {bwd} backward(s) each "
                f"({batches * (1 + bwd)} passes)")
    if name == "llc":
        return (f"{c.llc_chains} chains × {c.llc_steps} steps per selection, 1 forward and 1 backward each, "
                "plus the MALA checks and the nβ sweep")
    return "from saved files, no model passes"


def _run_one(stage: Stage, ctx: RunContext) -> dict[str, Any]:
    """Run one stage into its staging folder, then move its outputs into place and write its marker last.
    A failure or interrupt leaves the previous outputs and marker as they were."""
    out, name, folder = ctx.out, stage.name, ctx.folder
    inputs = {dep: read_marker(out, dep)["id"] for dep in stage.after}
    folder.discard(name)
    if ctx.force:
        folder.discard_progress(name)
    log = ctx.log
    log(f"{name}: running")
    t0 = time.perf_counter()
    ctx.stage = None if stage.always else name
    try:
        # only the statistics pass is shared by the ranks of `torchrun` (run/distributed.py: the other ranks
        # leave after it); every other stage runs on rank 0 alone, so its passes must not wait for them
        with contextlib.nullcontext() if name == "stats" else local_only():
            outputs, summary = stage.run(ctx)
    except BaseException:
        folder.discard(name)
        raise
    finally:
        ctx.stage = None
    seconds = time.perf_counter() - t0
    if not stage.always:
        marker = _marker_path(out, name)
        marker.unlink(missing_ok=True)  # the outputs change now: no marker until they all are in place
        folder.commit(name, outputs)
        write_json(marker, {
            "stage": name, "id": uuid.uuid4().hex, "settings": stage.settings(ctx.config), "inputs": inputs,
            "outputs": outputs, "seconds": seconds, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "summary": summary,
        })
        folder.record(f"{name}.marker", [folder.relative(marker)])
        folder.discard_progress(name)
    log(f"{name}: done in {seconds:.1f} s")
    return {"status": "ran", "seconds": seconds}


@contextlib.contextmanager
def _forward_warnings(log: Callable[[str], None]) -> Iterator[None]:
    """Report library warnings through the run log (one line each, no source location)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    for w in caught:
        log(f"warning: {' '.join(str(w.message).split())}")


# ---------------------------------------------------------------------------------------------------------
# the stages
# ---------------------------------------------------------------------------------------------------------
def _stats_settings(c: RunConfig) -> dict[str, Any]:
    return {"model": model_identity(c.model), "data": data_identity(c.data), **_fingerprints(c),
            "layers": c.layers, "sites": list(c.sites), "jacobian": c.jacobian, "n_probes": c.n_probes,
            "precision": c.precision, "n_tokens": c.n_tokens,
            "seq_len": c.seq_len, "batch_size": c.batch_size, "sync": c.sync, "seed": c.seed}


def _fingerprints(c: RunConfig) -> dict[str, str | None]:
    """Hashes of the files behind the model and data paths: a changed file at the same path is a changed
    setting (refused without --force, recomputed with it)."""
    return {"model_fingerprint": content_fingerprint(model_identity(c.model)),
            "data_fingerprint": content_fingerprint(data_identity(c.data))}


def _check_stats(ctx: RunContext) -> None:
    c = ctx.config
    tld.resolve_sites(ctx.model, list(c.sites), layers=ctx.layers)
    ctx.data(n_tokens=c.n_tokens, batch_size=c.batch_size)


def _run_stats(ctx: RunContext) -> tuple[list[str], dict[str, Any]]:
    c = ctx.config
    model = ctx.model
    _check_stats(ctx)
    sites = tld.resolve_sites(model, list(c.sites), layers=ctx.layers)
    data = ctx.data(n_tokens=c.n_tokens, batch_size=c.batch_size)
    adapter = tld.ModelAdapter(model)
    sync = c.sync
    partial = ctx.folder.stats_partial
    ctx.log(footprint_estimate(model, sites, data, jacobian=c.jacobian is not None, sync=sync,
                               layers=ctx.layers, precision=c.precision))
    if partial.exists() and ctx.force:
        ctx.log(f"stats: --force: discarding the partial checkpoint {partial} and starting afresh")
        _drop_partial(partial)
    elif partial.exists():
        ctx.log(f"stats: resuming the interrupted pass from {partial}")
    try:
        with _forward_warnings(ctx.log):
            stats = tld.collect(
                model, data, sites=sites, jacobian=c.jacobian, n_probes=c.n_probes, precision=c.precision,
                seed=c.seed, head_sync=sync, neuron_sync=sync and adapter.d_mlp is not None, sync_layers=ctx.layers,
                checkpoint=partial, checkpoint_every=max(1, math.ceil(len(data) / 10)), resume=True,
                progress=ctx.progress,
            )
    except (IncompatibleStatsError, tld.CorruptFileError) as err:
        if not partial.exists():
            raise
        raise BadInputError(
            f"the partial checkpoint of an interrupted stats pass cannot be continued with these settings "
            f"({' '.join(str(err).split(';')[0].split())}); pass --force to discard it and start afresh"
        ) from None
    stats.save(ctx.target.stats)
    _drop_partial(partial)
    return ["stats.safetensors", "stats.json"], {"n_tokens": stats.n_tokens, "sites": stats.sites,
                                                  "collect_seconds": stats.meta.get("seconds")}


def footprint_estimate(model: Any, sites: Sequence[str], data: tld.TokenBatches, *, jacobian: bool, sync: bool,
                       layers: Sequence[int], precision: str = "accurate") -> str:
    """One line, printed before the statistics pass: the disk a run will write and its memory peak.

    Disk: the float64 statistics (their accumulators, :func:`tl_degeneracy.plan_memory`) and at most
    ``3·8·d²`` bytes per site for the bases (interaction C and C⁺ of at most d rows, PCA C). Memory: the plan's
    estimated peak. Example: ``stats: estimated disk ≤ 12.0 MiB (statistics 4.1 MiB, bases ≤ 7.9 MiB); ...``.
    """
    adapter = tld.ModelAdapter(model)
    sync_layers = list(layers) if sync else []
    plan = tld.plan_memory(model, list(sites), batch_size=data.batch_size, seq_len=data.seq_len, jacobian=jacobian,
                           head_sync_layers=sync_layers,
                           neuron_sync_layers=sync_layers if adapter.d_mlp is not None else [],
                           precision=precision)
    widths = [site_dim(model, s) for s in sites]
    bases = 3 * 8 * sum(d * d for d in widths) if jacobian else 0
    disk = plan.accumulator_bytes + bases
    return (f"stats: estimated disk ≤ {_size(disk)} (statistics {_size(plan.accumulator_bytes)}, "
            f"bases ≤ {_size(bases)}); estimated memory peak {_size(plan.peak_bytes())}; "
            f"{data.n_counted} counted tokens in {len(data)} batches")


def _size(n: float) -> str:
    """Bytes for people, rounded up: ``_size(3.2e9) == '3.0 GiB'``, ``_size(5e6) == '4.8 MiB'``."""
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2)):
        if n >= scale or unit == "MiB":
            return f"{math.ceil(n / scale * 10) / 10:.1f} {unit}"
    raise AssertionError("unreachable")


def _drop_partial(partial: Path) -> None:
    for p in (partial, partial.with_suffix(".json"), *partial.parent.glob(f"{partial.stem}.pass*")):
        p.unlink(missing_ok=True)


def _basis_settings(c: RunConfig) -> dict[str, Any]:
    return {"rtol": c.rtol, "atol": c.atol, "center": True, "scaling": "sqrt_lambda"}


def _run_basis(ctx: RunContext) -> tuple[list[str], dict[str, Any]]:
    c = ctx.config
    stats = tld.Stats.load(ctx.folder.stats)
    if not (stats.meta.get("jacobian") or {}).get("metric"):
        raise BadInputError(
            f"'{ctx.folder.stats}' holds no Jacobian statistics (collected with --jacobian none); "
            "the interaction basis needs them: re-run the stats stage with --jacobian kl --force"
        )
    bases, pcas = {}, {}
    sites = list(stats.sites)
    with _forward_warnings(ctx.log):
        for i, site in enumerate(sites):  # one site at a time, with a progress line each (large models: minutes)
            t0 = time.perf_counter()
            bases.update(tld.interaction_bases(stats, sites=[site], center=True, rtol=c.rtol, atol=c.atol,
                                               scaling="sqrt_lambda"))
            pcas[site] = dataclasses.replace(
                tld.pca_basis(stats.gram(site), mean=stats.mean(site), rtol=c.rtol), source=bases[site].source)
            ctx.log(f"basis: site {i + 1}/{len(sites)} {site}: d={bases[site].input_dim}, "
                    f"dim={bases[site].dim}, {time.perf_counter() - t0:.1f} s")
    outputs, summary = [], {}
    for site, ib in bases.items():
        for kind, basis in (("interaction", ib), ("pca", pcas[site])):
            path = basis.save(ctx.target.basis(site, kind))
            outputs += [ctx.target.relative(path), ctx.target.relative(path.with_suffix(".json"))]
        summary[site] = {"d": ib.input_dim, "rank_G": ib.rank_G, "dim": ib.dim, "pca_dim": pcas[site].dim}
    return outputs, summary


def _ablate_settings(c: RunConfig) -> dict[str, Any]:
    return {"model": model_identity(c.model), "data": data_identity(c.data), "n_tokens": c.ablate_n_tokens,
            "batch_size": c.ablate_batch_size, "seq_len": c.seq_len, "loss": "kl", "keep": "schedule",
            "tolerance": c.ablate_tolerance}


def _check_ablate(ctx: RunContext) -> None:
    c = ctx.config
    if not (isinstance(c.ablate_tolerance, int | float) and math.isfinite(c.ablate_tolerance)
            and c.ablate_tolerance >= 0):
        raise BadInputError(f"ablate_tolerance must be a finite number >= 0, got {c.ablate_tolerance!r}")
    ctx.data(n_tokens=c.ablate_n_tokens, batch_size=c.ablate_batch_size)


def _run_ablate(ctx: RunContext) -> tuple[list[str], dict[str, Any]]:
    """KL ablation curves of the interaction and PCA bases at every site, with the quadratic prediction."""
    c = ctx.config
    stats = tld.Stats.load(ctx.folder.stats)
    with_prediction = (stats.meta.get("jacobian") or {}).get("metric") == "kl"
    data = ctx.data(n_tokens=c.ablate_n_tokens, batch_size=c.ablate_batch_size)
    # an interrupted stage resumes site by site: the progress folder keeps each finished site's curves and
    # the identity (settings, bases) they were made for
    progress = ctx.progress_folder
    identity = json_safe({"settings": _ablate_settings(c), "basis": (read_marker(ctx.out, "basis") or {}).get("id")})
    if progress.root.is_dir() and not (progress.ablation_identity.is_file()
                                       and read_json(progress.ablation_identity) == identity):
        ctx.folder.discard_progress("ablate")
    write_json(progress.ablation_identity, identity)
    outputs, summary = [], {}
    sites = ctx.folder.saved_bases("interaction")
    for site, ib_path in sites.items():
        bases = {"interaction": tld.InteractionBasis.load(ib_path),
                 "pca": tld.InteractionBasis.load(ctx.folder.saved_bases("pca")[site])}
        done = [tensor_path(progress.ablation_curve(site, kind)) for kind in bases]
        if all(p.is_file() and p.with_suffix(".json").is_file() for p in done):
            ctx.log(f"ablate: {site} (done before the interruption)")
            curves = {kind: tld.AblationCurve.load(p) for kind, p in zip(bases, done, strict=True)}
        else:
            ctx.log(f"ablate: {site}")
            with _forward_warnings(ctx.log):
                curves = tld.ablation_curves(ctx.model, data, bases, site=site, loss="kl",
                                             stats=stats if with_prediction else None, progress=ctx.progress)
            for kind, curve in curves.items():
                curve.save(progress.ablation_curve(site, kind))
        summary[site] = {}
        for kind, curve in curves.items():
            path = curve.save(ctx.target.ablation_curve(site, kind))
            outputs += [ctx.target.relative(path), ctx.target.relative(path.with_suffix(".json"))]
            summary[site][kind] = {"directions_needed": tld.directions_needed(curve, c.ablate_tolerance),
                                   "dim": curve.dim, "kl_at_dim": float(curve.loss[-1])}
    return outputs, {"tolerance": c.ablate_tolerance, "sites": summary}


GRAPH_OPTIONS = {"method": "integrated", "n_points": 2, "estimator": "probe", "n_probes": 1, "lib_probes": 2}
#: bases whose edges-needed the graph stage compares on the first pair (companion paper's sparsity measure)
EDGE_KINDS = ("local", "interaction", "pca")


def _graph_settings(c: RunConfig) -> dict[str, Any]:
    return {"n_tokens": c.graph_n_tokens, "eps": c.graph_eps, "rtol": c.rtol, "atol": c.atol, "seed": c.seed,
            "batch_size": c.batch_size, **GRAPH_OPTIONS, "edges_needed": {"pair": "first", "loss": "kl",
                                                                         "tolerance": c.ablate_tolerance}}


def _run_graph(ctx: RunContext) -> tuple[list[str], dict[str, Any]]:
    """LIB of the residual stream (resid_pre of every analysed layer), its interaction graph, modules at
    ``graph_eps`` when set (the report stage draws the graph from the saved file), and the edges needed on the
    first pair in the local, interaction and PCA bases (KL within ``ablate_tolerance``).

    Resumes after an interrupt: the progress folder keeps the LIB and graph, then each basis's edges needed,
    with the identity (settings, statistics) they were made for."""
    c = ctx.config
    stats = tld.Stats.load(ctx.folder.stats)
    sites = sorted((s for s in stats.sites if s.endswith(".hook_resid_pre")), key=lambda s: int(s.split(".")[1]))
    if len(sites) < 2:
        raise BadInputError("the graph stage needs resid_pre statistics at two or more layers; collect with "
                            "--sites resid_pre and two or more --layers")
    data = ctx.data(n_tokens=c.graph_n_tokens, batch_size=c.batch_size)
    progress = ctx.progress_folder
    identity = json_safe({"settings": _graph_settings(c), "stats": (read_marker(ctx.out, "stats") or {}).get("id")})
    if progress.root.is_dir() and not (progress.graph_identity.is_file()
                                       and read_json(progress.graph_identity) == identity):
        ctx.folder.discard_progress("graph")
    write_json(progress.graph_identity, identity)
    if progress.graph_result.is_file() and all(tensor_path(progress.graph / f"{s}.local").is_file() for s in sites):
        ctx.log("graph: local bases and graph (done before the interruption)")
        bases = {s: tld.InteractionBasis.load(progress.graph / f"{s}.local") for s in sites}
        graph = tld.InteractionGraph.load(progress.graph_result)
    else:
        with _forward_warnings(ctx.log):
            bases = tld.local_interaction_bases(ctx.model, data, sites, stats=stats, rtol=c.rtol, atol=c.atol,
                                                n_probes=GRAPH_OPTIONS["lib_probes"], seed=c.seed)
            graph = _pair_graph(ctx, data, bases, sites)
        for site, basis in bases.items():
            basis.save(progress.graph / f"{site}.local")
        graph.save(progress.graph_result)
    target = ctx.target
    outputs = []
    for site, basis in bases.items():
        path = basis.save(target.graph / f"{site}.local")
        outputs += [target.relative(path), target.relative(path.with_suffix(".json"))]
    path = graph.save(target.graph_result)
    outputs += [target.relative(path), target.relative(path.with_suffix(".json"))]
    summary: dict[str, Any] = {"sites": sites, "dims": [b.dim for b in bases.values()],
                               "n_tokens": graph.meta["n_tokens"]}
    if c.graph_eps is not None:
        modules = tld.find_modules(graph, eps=c.graph_eps, seed=c.seed)
        summary["modules"] = {"n_modules": modules.n_modules, "cost": modules.cost,
                              "modularity": modules.modularity, "eps": modules.eps}
    pair = (sites[0], sites[1])
    summary["edges_needed"] = {"pair": list(pair), "tolerance": c.ablate_tolerance, "loss": "kl", "kinds": {}}
    for kind in EDGE_KINDS:
        done = tensor_path(progress.edges_needed(kind))
        if done.is_file() and done.with_suffix(".json").is_file():
            ctx.log(f"graph: edges needed ({kind} basis, done before the interruption)")
            needed = tld.EdgesNeeded.load(done)
        else:
            ctx.log(f"graph: edges needed on {pair[0]} -> {pair[1]} ({kind} basis)")
            if kind == "local":
                pair_bases, pair_graph = {s: bases[s] for s in pair}, graph
            else:
                pair_bases = _stats_bases(stats, pair, kind, c)
                with _forward_warnings(ctx.log):
                    pair_graph = _pair_graph(ctx, data, pair_bases, list(pair))
            with _forward_warnings(ctx.log):
                needed = tld.edges_needed(ctx.model, data, pair_bases, pair_graph, pair=pair,
                                          tolerance=c.ablate_tolerance, loss="kl", progress=ctx.progress)
            needed.save(progress.edges_needed(kind))
        path = needed.save(target.edges_needed(kind))
        outputs += [target.relative(path), target.relative(path.with_suffix(".json"))]
        summary["edges_needed"]["kinds"][kind] = {"n_edges": needed.n_edges, "n_total": needed.n_total,
                                                  "fraction": needed.fraction, "probes": len(needed.probed)}
    return outputs, summary


def _pair_graph(ctx: RunContext, data: tld.TokenBatches, bases: dict[str, Any], sites: list[str]) -> Any:
    return tld.interaction_graph(ctx.model, data, bases, sites, method=GRAPH_OPTIONS["method"],
                                 n_points=GRAPH_OPTIONS["n_points"], estimator=GRAPH_OPTIONS["estimator"],
                                 n_probes=GRAPH_OPTIONS["n_probes"], seed=ctx.config.seed)


def _stats_bases(stats: tld.Stats, sites: tuple[str, str], kind: str, c: RunConfig) -> dict[str, Any]:
    """The interaction or PCA bases of ``sites`` as the basis stage builds them (same tolerances)."""
    if kind == "interaction":
        return tld.interaction_bases(stats, sites=list(sites), center=True, rtol=c.rtol, atol=c.atol,
                                     scaling="sqrt_lambda")
    return {s: tld.pca_basis(stats.gram(s), mean=stats.mean(s), rtol=c.rtol) for s in sites}


def _sync_settings(c: RunConfig) -> dict[str, Any]:
    return {"measure": c.sync_measure, "tau_heads": c.tau_heads, "tau_neurons": c.tau_neurons}


def _run_sync(ctx: RunContext) -> tuple[list[str], dict[str, Any]]:
    c = ctx.config
    stats = tld.Stats.load(ctx.folder.stats)
    if not (stats.meta.get("head_sync") or stats.meta.get("neuron_sync")):
        raise BadInputError(
            f"'{ctx.folder.stats}' holds no synchronisation sums; "
            "re-run the stats stage with --sync --force"
        )
    summary: dict[str, Any] = {"measure": c.sync_measure, "tau_heads": c.tau_heads,
                               "tau_neurons": c.tau_neurons, "layers": {}}
    outputs = []
    parts = (("heads", "head", tld.head_sync, c.tau_heads), ("neurons", "neuron", tld.neuron_sync, c.tau_neurons))
    for kind, unit, analyse, tau in parts:
        for layer in stats.sync_layers(unit):
            result = analyse(stats, layer)
            path = result.save(ctx.target.sync_result(kind, layer))
            outputs += [ctx.target.relative(path), ctx.target.relative(path.with_suffix(".json"))]
            summary["layers"].setdefault(str(layer), {})[kind] = {
                "n_units": result.n_units,
                "dof": result.dof(tau, measure=c.sync_measure).to_dict(),
                "sweep": result.sweep(measure=c.sync_measure, dof=False).to_dict(),
            }
    write_json(ctx.target.sync_summary, summary)
    outputs.append(ctx.target.relative(ctx.target.sync_summary))
    brief = {layer: {k: len(v["dof"]["blocks"]) for k, v in parts_.items()}
             for layer, parts_ in summary["layers"].items()}
    return outputs, {"blocks": brief}


def llc_selections(params: Sequence[str], layers: Sequence[int]) -> list[str]:
    """Parameter selections with ``{l}`` expanded to every layer, in order, without repeats."""
    out: list[str] = []
    for p in params:
        for sel in ([p.replace("{l}", str(x)) for x in layers] if "{l}" in p else [p]):
            if sel not in out:
                out.append(sel)
    return out


def _llc_settings(c: RunConfig) -> dict[str, Any]:
    return {"model": model_identity(c.model), "data": data_identity(c.data), **_fingerprints(c),
            "layers": c.layers, "params": list(c.llc_params), "nbeta": c.llc_nbeta, "nbetas": list(c.llc_nbetas),
            "step_size": c.llc_step_size, "localization": c.llc_localization, "chains": c.llc_chains,
            "steps": c.llc_steps, "max_steps": c.llc_max_steps, "burnin": c.llc_burnin, "n_tokens": c.llc_n_tokens,
            "batch_size": c.llc_batch_size, "seq_len": c.seq_len, "seed": c.seed}


def _check_llc(ctx: RunContext) -> None:
    for sel in llc_selections(ctx.config.llc_params, ctx.layers):
        if sel != "all":
            tld.parameter_masks(ctx.model, sel)
    ctx.data(n_tokens=ctx.config.llc_n_tokens, batch_size=ctx.config.llc_batch_size)


def _llc_jobs(ctx: RunContext) -> tuple[list[tuple[Callable[[RunFolder], Path], str, float, float, float]],
                                          list[float]]:
    """Every estimate of the stage, in order, as (where in a run folder, selection, nβ, step size, localization):
    each selection at the base nβ, then the whole model at every other nβ of the sweep (the base nβ's whole-model
    estimate is the 'all' selection's, not sampled again), with the step scaled by nβ_0/nβ_i and the localization
    by nβ_i/nβ_0 (as :func:`tl_degeneracy.llc_scale_sweep` does), so that step·nβ and step·γ — and with them the
    acceptance and the equilibration time the burn-in was calibrated for — stay those of the main estimate."""
    c = ctx.config
    selections = llc_selections(c.llc_params, ctx.layers)
    nbetas = sorted(set(c.llc_nbetas or (c.llc_nbeta / 3, c.llc_nbeta, c.llc_nbeta * 3)))
    jobs: list[tuple[Callable[[RunFolder], Path], str, float, float, float]] = [
        ((lambda f, sel=sel: f.llc_result(sel)), sel, c.llc_nbeta, c.llc_step_size, c.llc_localization)
        for sel in selections]
    for i, nb in enumerate(nbetas):
        if nb == c.llc_nbeta and "all" in selections:
            continue
        jobs.append(((lambda f, i=i: f.llc_scale / f"run_{i:03d}"), "all", nb, c.llc_step_size * c.llc_nbeta / nb,
                     c.llc_localization * nb / c.llc_nbeta))
    return jobs, nbetas


def llc_step_schedule(n_steps: int, max_steps: int) -> list[int]:
    """The chain lengths the LLC stage tries in turn: ``n_steps``, doubled while at most ``max_steps``.
    Example: ``llc_step_schedule(1000, 4000)`` → ``[1000, 2000, 4000]``."""
    schedule = [n_steps]
    while schedule[-1] * 2 <= max_steps:
        schedule.append(schedule[-1] * 2)
    return schedule


def _load_attempt(folder: Path, keys: list[str]) -> tuple[Any, int] | None:
    """The LLCResult saved in ``folder`` by one of this job's attempts (same stage settings, selection, nβ, step;
    ``keys[i]`` is the attempt with the i-th chain length), and the index of the next attempt; or None."""
    try:
        result = tld.LLCResult.load(folder)
    except Exception:  # noqa: BLE001 - missing, partial or unreadable: compute it again
        return None
    key = result.settings.get("run_key")
    return (result, keys.index(key) + 1) if key in keys else None


def _run_llc(ctx: RunContext) -> tuple[list[str], dict[str, Any]]:
    """Resumable: each estimate is saved in the stage's progress folder as it finishes; a rerun loads the
    finished ones (same settings: from the progress folder after an interrupt, or from the run folder's own
    results) and computes only what is missing. The outputs go to the staging folder and replace the old
    ones only when every estimate is done."""
    c = ctx.config
    model = ctx.model
    data = ctx.data(n_tokens=c.llc_n_tokens, batch_size=c.llc_batch_size)
    options: dict[str, Any] = {"loss": "kl", "n_chains": c.llc_chains, "n_burnin": c.llc_burnin, "seed": c.seed,
                               "on_divergence": "drop", "progress": ctx.progress}
    stage_key = json.dumps(json_safe(_llc_settings(c)), sort_keys=True)
    jobs, nbetas = _llc_jobs(ctx)
    progress = ctx.progress_folder
    done: dict[tuple[str, float], Any] = {}
    schedule = llc_step_schedule(c.llc_steps, 4 * c.llc_steps if c.llc_max_steps is None else c.llc_max_steps)
    with _forward_warnings(ctx.log):
        for where, sel, nb, step, gamma in jobs:
            keys = [f"{stage_key}|{sel}|{nb!r}|{step!r}|{gamma!r}|steps={n}" for n in schedule]
            result, first = _load_attempt(where(progress), keys) or _load_attempt(where(ctx.folder), keys) or (None, 0)
            if result is not None:
                ctx.log(f"llc: parameters '{sel}' at nβ = {nb:g} ({schedule[first - 1]} steps) already computed, "
                        "loaded")
            for attempt in range(first, len(schedule)):
                if result is not None and not needs_longer_chains(result.diagnostics):
                    break
                if result is not None:
                    ctx.log(f"llc: '{sel}' at nβ = {nb:g} {result.verdict}; sampling again with "
                            f"{schedule[attempt]} steps")
                else:
                    ctx.log(f"llc: sampling parameters '{sel}' at nβ = {nb:g}")
                result = tld.estimate_llc(model, data, params=sel, nbeta=nb, step_size=step, localization=gamma,
                                          n_steps=schedule[attempt], **options)
                result.settings["run_key"] = keys[attempt]
                result.save(where(progress))
            done[(sel, nb)] = result
    results = {sel: r for (sel, nb), r in done.items() if nb == c.llc_nbeta and _is_selection(ctx, sel)}
    sweep = tld.LLCScaleSweep([done[("all", nb)] for nb in nbetas])
    target = ctx.target
    for (sel, nb), result in done.items():
        if nb == c.llc_nbeta and _is_selection(ctx, sel):
            result.save(target.llc_result(sel))
    sweep.save(target.llc_scale)  # every nβ's whole-model result, the base nβ's being the 'all' selection's
    write_json(target.llc_summary, {"loss": "kl", "selections": {sel: sel for sel in results},
                                    "scale": "scale", "nbeta": c.llc_nbeta, "nbetas": nbetas})
    outputs = [target.relative(target.llc_result(sel) / f"llc.{ext}") for sel in results
               for ext in ("json", "safetensors")]
    outputs += [target.relative(target.llc_scale / "sweep.json"), target.relative(target.llc_summary)]
    brief = {sel: {"llc_mean": r.llc_mean, "llc_se": r.llc_se, "llc_std": r.llc_std, "eps_hat": r.eps_hat,
                   "verdict": r.verdict} for sel, r in results.items()}
    brief["scale"] = sweep.rows()
    return outputs, brief


def _is_selection(ctx: RunContext, sel: str) -> bool:
    """Whether ``sel`` is one of the stage's parameter selections (not only a sweep row)."""
    return sel in llc_selections(ctx.config.llc_params, ctx.layers)


def _report_settings(c: RunConfig) -> dict[str, Any]:
    return {}


def _run_report(ctx: RunContext) -> tuple[list[str], dict[str, Any]]:
    from tl_degeneracy.run import report

    path = report.write_report(ctx.out)
    return [ctx.folder.relative(path)], {}


register(Stage("stats", "stream activation, Jacobian and synchronisation statistics (checkpointed)",
               _run_stats, _stats_settings, requires=("collect", "resolve_sites", "load_model"), check=_check_stats))
register(Stage("basis", "interaction and PCA bases per site", _run_basis, _basis_settings, after=("stats",),
               requires=("interaction_bases", "pca_basis")))
register(Stage("ablate", "ablation curves of the interaction and PCA bases per site (KL, measured and predicted)",
               _run_ablate, _ablate_settings, after=("stats", "basis"),
               requires=("ablation_curves", "directions_needed"), check=_check_ablate))


register(Stage("graph", "local interaction basis and interaction graph of the residual stream, edges needed per "
               "basis (bundled model by default)", _run_graph, _graph_settings, after=("stats",),
               requires=("local_interaction_bases", "interaction_graph", "find_modules", "edges_needed")))
register(Stage("sync", "head and neuron synchronisation per layer", _run_sync, _sync_settings, after=("stats",),
               requires=("head_sync", "neuron_sync")))
register(Stage("llc", "behavioral LLC of the whole model and of each layer, and an nβ sweep", _run_llc,
               _llc_settings, requires=("estimate_llc", "llc_scale_sweep"), check=_check_llc))
register(Stage("report", "tables, plots and index.md from the saved results", _run_report, _report_settings,
               always=True))
