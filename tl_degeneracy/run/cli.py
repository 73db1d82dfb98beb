"""The ``tl-degeneracy`` command: sweep a model's layers and write a report folder.

::

    tl-degeneracy run --out runs/demo                       # bundled model and data, offline, CPU minutes
    tl-degeneracy run --model gpt2 --layers 0-11 --out runs/gpt2
    tl-degeneracy run --stages basis --out runs/demo        # one stage alone, from saved statistics
    tl-degeneracy report runs/demo                          # redraw tables, plots and index.md

Parsing only: the stages live in :mod:`tl_degeneracy.run.pipeline`, the drawing in :mod:`tl_degeneracy.run.report`.
Errors print one line ``error: ...`` on stderr and exit 1 (argparse's own usage errors exit 2); an
interrupted run exits 130 and resumes when the same command is run again.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import platform
import shlex
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from tl_degeneracy._io import write_json
from tl_degeneracy._version import __version__
from tl_degeneracy.errors import BadInputError, TLDegeneracyError
from tl_degeneracy.run import distributed, report
from tl_degeneracy.run.layout import RunFolder
from tl_degeneracy.run.pipeline import STAGES, RunConfig, default_stages, parse_layers, run_stages

#: site kinds offered by --sites (attn_pattern is read by the synchronisation analysis, not a vector site)
_SITE_CHOICES = ("resid_pre", "resid_mid", "resid_post", "mlp_pre", "mlp_post", "attn_z", "ln_final")


# ---------------------------------------------------------------------------------------------------------
# argument types (argparse turns ArgumentTypeError into a usage error, exit 2)
# ---------------------------------------------------------------------------------------------------------
def _int_at_least(low: int):
    """An argparse type: a whole number >= ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected a number >= {low}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _float(low: float, *, strict: bool) -> Callable[[str], float]:
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
        if not (value > low if strict else value >= low) or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"expected a finite number {'>' if strict else '>='} {low}, got {text}")
        return value

    return parse


def _float_list(text: str) -> tuple[float, ...]:
    parse = _float(0.0, strict=True)
    values = tuple(parse(p) for p in text.split(",") if p.strip())
    if not values:
        raise argparse.ArgumentTypeError("expected a comma-separated list of positive numbers")
    return values


def _layers(text: str) -> tuple[int, ...] | None:
    try:
        return parse_layers(text)
    except TLDegeneracyError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _sites(text: str) -> tuple[str, ...]:
    kinds = tuple(k.strip() for k in text.split(",") if k.strip())
    if not kinds:
        raise argparse.ArgumentTypeError("no site kinds given")
    for kind in kinds:
        if kind not in _SITE_CHOICES and "." not in kind:
            raise argparse.ArgumentTypeError(
                f"unknown site kind '{kind}'; choose from {', '.join(_SITE_CHOICES)} or give a hook name"
            )
    return kinds


def _stages(text: str) -> tuple[str, ...]:
    names = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown stage(s) {', '.join(unknown) or '(none)'}; "
                                         f"choose from {', '.join(STAGES)}")
    return names


def _param_list(text: str) -> tuple[str, ...]:
    items = tuple(p.strip() for p in text.split(",") if p.strip())
    if not items:
        raise argparse.ArgumentTypeError("expected a comma-separated list of parameter selections")
    return items


# ---------------------------------------------------------------------------------------------------------
# the parser
# ---------------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    parser = argparse.ArgumentParser(
        prog="tl-degeneracy",
        description="Degeneracy in the loss landscape of a TransformerLens model (Bushnaq et al. 2024): "
                    "statistics, interaction bases, synchronisation and the behavioral LLC per layer, "
                    "written to a report folder.",
    )
    parser.add_argument("--version", action="version", version=f"tl-degeneracy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{run,calibrate,report}")

    run = sub.add_parser("run", help="sweep layers and write a report folder",
                         description="Run the stages (stats, basis, ablate, graph, sync, llc, report) into --out. "
                                     "A stage whose outputs already exist with the same settings is skipped, so an "
                                     "interrupted run resumes when the same command is run again.")
    _add_run_arguments(run, d)
    cal = sub.add_parser("calibrate", help="choose the LLC step size and localization on a grid (into --out)",
                         description="Short SGLD chains over a grid of step sizes and localizations (the other "
                                     "--llc-* options as for `run`); writes llc/calibration/ (table, heat map) "
                                     "into --out and prints the recommended setting.")
    _add_run_arguments(cal, d)

    rep = sub.add_parser("report", help="redraw tables, plots and index.md of a run folder (no model needed)",
                         description="Redraw summary.csv, summary.md, plots/*.png and index.md from the results "
                                     "saved in DIR.")
    rep.add_argument("dir", metavar="DIR", help="a folder written by `tl-degeneracy run`")
    return parser


def _add_run_arguments(run: argparse.ArgumentParser, d: RunConfig) -> None:
    g = run.add_argument_group("model and data")
    g.add_argument("--model", default=None, metavar="NAME_OR_PATH",
                   help="hub name (needs a network) or a save_pretrained folder; default: the bundled model")
    g.add_argument("--data", default=None, metavar="SOURCE",
                   help="token file (.safetensors) or bundled name, text file, or folder of text files; "
                        "default: the bundled held-out data")
    g.add_argument("--layers", type=_layers, default=d.layers, metavar="SPEC",
                   help="'all' (default), a range '0-3' or a list '0,2,5'")
    g.add_argument("--sites", type=_sites, default=d.sites, metavar="KINDS",
                   help=f"comma-separated site kinds ({', '.join(_SITE_CHOICES)}); default: "
                        f"{','.join(d.sites)}")
    g.add_argument("--n-tokens", type=_positive_int, default=d.n_tokens, metavar="N",
                   help=f"counted tokens for the statistics (default {d.n_tokens})")
    g.add_argument("--seq-len", type=_positive_int, default=d.seq_len, metavar="T",
                   help=f"tokens per sequence (default {d.seq_len})")
    g.add_argument("--batch-size", type=_positive_int, default=d.batch_size, metavar="B",
                   help=f"sequences per batch (default {d.batch_size})")
    g.add_argument("--device", default=d.device, help="'auto' (GPU when visible, default), 'cpu', 'cuda', ...")
    g.add_argument("--seed", type=_nonneg_int, default=d.seed, metavar="S",
                   help="seed of probes and SGLD noise (default 0)")
    g.add_argument("--threads", type=_positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: the physical cores this process may use, or "
                        "$OMP_NUM_THREADS); 1 is fastest on a busy shared machine")

    g = run.add_argument_group("statistics, bases and synchronisation")
    g.add_argument("--jacobian", choices=("kl", "mse", "none"), default=d.jacobian,
                   help="output metric of the Jacobian statistics (default kl); 'none' skips them and the basis")
    g.add_argument("--n-probes", type=_positive_int, default=d.n_probes, metavar="K",
                   help=f"probes per token for the Jacobian estimate (default {d.n_probes})")
    g.add_argument("--precision", choices=("accurate", "fast"), default=d.precision,
                   help="'accurate' (float32, TF32 off; default) or 'fast' (bfloat16 autocast and products, "
                        "float64 totals)")
    g.add_argument("--rtol", type=_float(0.0, strict=False), default=d.rtol, metavar="R",
                   help=f"relative tolerance of the bases (default {d.rtol:g})")
    g.add_argument("--atol", type=_float(0.0, strict=False), default=d.atol, metavar="EPS",
                   help="absolute tolerance ε on Λ of the interaction basis (default 0)")
    g.add_argument("--sync", action=argparse.BooleanOptionalAction, default=d.sync,
                   help="collect and analyse head and neuron synchronisation (default on)")
    g.add_argument("--sync-measure", choices=("distance", "normalized_distance"), default=d.sync_measure,
                   help=f"distance the thresholds apply to (default {d.sync_measure})")
    g.add_argument("--tau-heads", type=_float(0.0, strict=False), default=d.tau_heads, metavar="TAU",
                   help=f"threshold τ for synchronised head blocks in the table (default {d.tau_heads:g})")
    g.add_argument("--tau-neurons", type=_float(0.0, strict=False), default=d.tau_neurons, metavar="TAU",
                   help=f"threshold τ for synchronised neuron blocks in the table (default {d.tau_neurons:g})")

    g = run.add_argument_group("behavioral LLC")
    g.add_argument("--llc", action=argparse.BooleanOptionalAction, default=True,
                   help="estimate the behavioral LLC (default on)")
    g.add_argument("--llc-params", type=_param_list, default=d.llc_params, metavar="SELECTIONS",
                   help="comma-separated parameter selections, {l} expands to every layer "
                        f"(default {','.join(d.llc_params)})")
    g.add_argument("--llc-nbeta", type=_float(0.0, strict=True), default=d.llc_nbeta, metavar="NBETA",
                   help=f"inverse temperature nβ (default {d.llc_nbeta:g})")
    g.add_argument("--llc-nbetas", type=_float_list, default=d.llc_nbetas, metavar="LIST",
                   help="nβ values of the whole-model sweep for λ(ε), N_eff(ε) (default: nβ/3, nβ, 3·nβ); "
                        "the step size is scaled by nβ/nβ_i")
    g.add_argument("--llc-step-size", type=_float(0.0, strict=True), default=d.llc_step_size, metavar="STEP",
                   help=f"SGLD step size at nβ (default {d.llc_step_size:g})")
    g.add_argument("--llc-localization", type=_float(0.0, strict=False), default=d.llc_localization,
                   metavar="GAMMA",
                   help=f"localization γ (default {d.llc_localization:g})")
    g.add_argument("--llc-chains", type=_positive_int, default=d.llc_chains, metavar="N",
                   help=f"SGLD chains (default {d.llc_chains})")
    g.add_argument("--llc-steps", type=_positive_int, default=d.llc_steps, metavar="N",
                   help=f"SGLD steps per chain, burn-in included (default {d.llc_steps})")
    g.add_argument("--llc-burnin", type=_nonneg_int, default=d.llc_burnin, metavar="N",
                   help=f"burn-in steps (default {d.llc_burnin})")
    g.add_argument("--llc-max-steps", type=_positive_int, default=None, metavar="N",
                   help="an estimate whose verdict fails only on mixing (R̂, ESS, plateau; acceptance fine) is sampled "
                        "again with twice the steps, up to N (default 4 × --llc-steps; equal to --llc-steps: never)")
    g.add_argument("--llc-n-tokens", type=_positive_int, default=d.llc_n_tokens, metavar="N",
                   help=f"counted tokens the sampler cycles through (default {d.llc_n_tokens})")
    g.add_argument("--llc-batch-size", type=_positive_int, default=d.llc_batch_size, metavar="B",
                   help=f"sequences per SGLD step (default {d.llc_batch_size})")
    g.add_argument("--llc-calibrate", action="store_true",
                   help="run: calibrate first (as `tl-degeneracy calibrate`) and use the recommended step size "
                        "and localization")
    g.add_argument("--calibrate-step-sizes", type=_float_list, default=None, metavar="LIST",
                   help="calibration grid of step sizes (default: --llc-step-size × 1/10, 1/3, 1, 3)")
    g.add_argument("--calibrate-localizations", type=_float_list, default=None, metavar="LIST",
                   help="calibration grid of localizations (default: --llc-localization × 1/10, 1, 10)")
    g.add_argument("--calibrate-params", default="all", metavar="SELECTION",
                   help="parameters the calibration samples (default all)")

    g = run.add_argument_group("ablation curves (ablate stage)")
    g.add_argument("--ablate-n-tokens", type=_positive_int, default=d.ablate_n_tokens, metavar="N",
                   help=f"counted tokens the ablation curves are measured on (default {d.ablate_n_tokens})")
    g.add_argument("--ablate-tolerance", type=_float(0.0, strict=False), default=d.ablate_tolerance, metavar="KL",
                   help="KL (nats) within which 'directions needed' counts a curve as unchanged "
                        f"(default {d.ablate_tolerance:g})")

    g = run.add_argument_group("interaction graph")
    g.add_argument("--graph", action=argparse.BooleanOptionalAction, default=None,
                   help="local interaction basis and interaction graph of the residual stream (default: on for "
                        "the bundled model only)")
    g.add_argument("--graph-n-tokens", type=_positive_int, default=d.graph_n_tokens, metavar="N",
                   help=f"counted tokens of the graph stage (default {d.graph_n_tokens})")
    g.add_argument("--graph-eps", type=_float(0.0, strict=True), default=d.graph_eps, metavar="EPS",
                   help="noise scale ε of the §5 module cut cost; modules are found only when given")

    g = run.add_argument_group("stages and output")
    g.add_argument("--stages", type=_stages, default=None, metavar="LIST",
                   help="comma-separated stages to run (stats,basis,ablate,graph,sync,llc,report); "
                        "default: all that apply")
    g.add_argument("--force", action="store_true",
                   help="recompute stages whose outputs already exist (the old outputs stay until the new ones are "
                        "complete); discards a partial statistics checkpoint instead of resuming it")
    g.add_argument("--yes", action="store_true",
                   help="run settings refused as absurdly expensive (e.g. --n-probes above 256)")
    g.add_argument("--out", default="tl-degeneracy-run", metavar="DIR",
                   help="run folder (default ./tl-degeneracy-run)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")


def _config_from(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=args.model, data=args.data, layers=args.layers, sites=args.sites,
        jacobian=None if args.jacobian == "none" else args.jacobian, n_probes=args.n_probes,
        precision=args.precision,
        n_tokens=args.n_tokens, seq_len=args.seq_len, batch_size=args.batch_size, sync=args.sync,
        rtol=args.rtol, atol=args.atol, sync_measure=args.sync_measure, tau_heads=args.tau_heads,
        tau_neurons=args.tau_neurons, llc_params=args.llc_params, llc_nbeta=args.llc_nbeta,
        llc_nbetas=args.llc_nbetas, llc_step_size=args.llc_step_size, llc_localization=args.llc_localization,
        llc_chains=args.llc_chains, llc_steps=args.llc_steps, llc_burnin=args.llc_burnin,
        llc_max_steps=args.llc_max_steps,
        llc_n_tokens=args.llc_n_tokens, llc_batch_size=args.llc_batch_size, seed=args.seed, device=args.device,
        graph=args.graph, graph_n_tokens=args.graph_n_tokens, graph_eps=args.graph_eps,
        ablate_n_tokens=args.ablate_n_tokens, ablate_tolerance=args.ablate_tolerance,
    )


# ---------------------------------------------------------------------------------------------------------
# run.json
# ---------------------------------------------------------------------------------------------------------
def _versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"tl_degeneracy": __version__, "python": platform.python_version()}
    for dist in ("torch", "transformer-lens", "transformers", "numpy", "matplotlib", "safetensors"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = None
    return out


def usable_cpus() -> list[int]:
    """The CPUs this process may run on (``os.sched_getaffinity``; every CPU where that is unavailable)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def default_threads() -> int:
    """Default torch thread count: the physical cores among the CPUs this process may use, at least 1.

    Hyper-threads of one core count once (Linux ``/sys/.../topology``; where that is unreadable every usable
    CPU counts), so the default is never more than the cores the process may use (a job scheduler's CPU set,
    ``taskset``). ``$OMP_NUM_THREADS``, when set, wins, as ``--threads`` does.

    Example: on an 8-core/16-thread laptop ``default_threads()`` is 8; under ``taskset -c 0,1`` it is 1 or 2.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    cores = set()
    for cpu in usable_cpus():
        topo = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            cores.add(((topo / "physical_package_id").read_text().strip(), (topo / "core_id").read_text().strip()))
        except OSError:
            cores.add(("cpu", str(cpu)))
    return max(1, len(cores))


def _machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "machine": platform.machine(),
                            "processor": platform.processor() or None, "cpu_count": os.cpu_count(),
                            "usable_cpus": len(usable_cpus()),
                            "torch_threads": torch.get_num_threads(), "cuda_available": torch.cuda.is_available()}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _previous_runs(out: Path) -> list[Any]:
    """The records of earlier invocations on the same folder (from its run.json), oldest first."""
    path = RunFolder(out).run_json
    if not path.is_file():
        return []
    try:
        old = json.loads(path.read_text())
    except json.JSONDecodeError:
        return []
    return [*old.pop("previous_runs", []), old]


# ---------------------------------------------------------------------------------------------------------
# commands
# ---------------------------------------------------------------------------------------------------------
def _raise_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _cmd_run(args: argparse.Namespace, argv: Sequence[str], parser: argparse.ArgumentParser) -> int:
    config = _config_from(args)
    if args.llc_burnin >= args.llc_steps:
        parser.error(f"--llc-burnin ({args.llc_burnin}) must be below --llc-steps ({args.llc_steps})")
    if args.llc_calibrate:
        RunFolder(args.out).claim()  # the calibration is written into the run folder: it must be ours
        cal = _calibrate(args, config, Path(args.out))
        if cal.recommended is None:
            raise BadInputError(f"--llc-calibrate found no setting to recommend ({cal.reason}); pass "
                                "--calibrate-step-sizes / --calibrate-localizations")
        config = dataclasses.replace(config, llc_step_size=cal.recommended["step_size"],
                                     llc_localization=cal.recommended["localization"])
    explicit = args.stages is not None
    stages = list(args.stages) if explicit else default_stages(config, llc=args.llc)
    if explicit:
        for name, off, flag in (("llc", not args.llc, "--no-llc"), ("sync", not args.sync, "--no-sync"),
                                ("basis", config.jacobian is None, "--jacobian none"),
                                ("graph", config.graph is False, "--no-graph")):
            if name in stages and off:
                parser.error(f"--stages {name} contradicts {flag}")
    out = Path(args.out)
    dctx = distributed.start()  # torchrun with several processes: rank 0 writes the run folder
    if dctx is not None:
        config = distributed.local_config(config)
        if not dctx.is_main:
            try:
                return distributed.follow(config, out, stages, dctx, force=args.force, threads=args.threads)
            finally:
                distributed.finish()
        distributed.share_markers(out, dctx)
    record: dict[str, Any] = {
        "command": "tl-degeneracy " + shlex.join(argv),
        "arguments": {k: v for k, v in vars(args).items() if k != "command"},
        "config": config.to_json(),
        "stages_requested": stages,
        "versions": _versions(),
        "machine": _machine(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "distributed": {"world_size": 1, "backend": None} if dctx is None else dctx.to_json(),
    }
    run_threads = args.threads if args.threads is not None else default_threads()
    record["machine"]["torch_threads"] = run_threads
    record["machine"]["threads_from"] = "--threads" if args.threads is not None else "default_threads()"
    if args.n_probes > MAX_PROBES and not args.yes:
        raise BadInputError(
            f"--n-probes {args.n_probes} means {args.n_probes} backward passes per batch (hours on any model); "
            f"at most {MAX_PROBES} runs without asking: pass --yes to run it anyway"
        )
    folder = RunFolder(out)
    folder.claim()  # refuses someone else's non-empty folder before anything is written in it
    with folder.lock():
        return _run_locked(args, config, out, stages, explicit, record)


#: --n-probes above this is refused without --yes (each probe is one backward pass per batch)
MAX_PROBES = 256


def _run_locked(args: argparse.Namespace, config: RunConfig, out: Path, stages: list[str], explicit: bool,
                record: dict[str, Any]) -> int:
    previous = _previous_runs(out)
    write_json(RunFolder(out).run_json, {**record, "result": "running", "previous_runs": previous})
    t0 = time.perf_counter()
    status: dict[str, Any] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(record["machine"]["torch_threads"])
    # a SIGTERM (a job scheduler's stop) ends the run like Ctrl-C: run.json records it, checkpoints stay valid
    on_main_thread = threading.current_thread() is threading.main_thread()
    sigterm = signal.signal(signal.SIGTERM, _raise_interrupt) if on_main_thread else None
    try:
        status = run_stages(config, out, stages, force=args.force, progress=not args.no_progress,
                            explicit=explicit)
        record["result"] = "ok"
    except KeyboardInterrupt:
        record["result"] = "interrupted"
        raise
    except BaseException as err:
        record["result"] = f"error: {type(err).__name__}: {err}"
        raise
    finally:
        torch.set_num_threads(threads)
        if on_main_thread:
            signal.signal(signal.SIGTERM, sigterm)
        record.update(stages=status, wall_seconds=time.perf_counter() - t0,
                      finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"), previous_runs=previous)
        write_json(RunFolder(out).run_json, record)
        distributed.finish()
    if RunFolder(out).index.is_file():
        print(f"[tl-degeneracy] report: {RunFolder(out).index}", file=sys.stderr)
    _print_llc_warnings(out)
    return 0


def _calibrate(args: argparse.Namespace, config: RunConfig, out: Path) -> Any:
    """The calibration grid of ``tl-degeneracy calibrate`` / ``run --llc-calibrate``, saved in the run folder."""
    import tl_degeneracy as tld
    from tl_degeneracy.run.pipeline import RunContext

    ctx = RunContext(config, out, progress=not args.no_progress)
    data = ctx.data(n_tokens=config.llc_n_tokens, batch_size=config.llc_batch_size)
    steps = args.calibrate_step_sizes or tuple(config.llc_step_size * f for f in (0.1, 1 / 3, 1.0, 3.0))
    gammas = args.calibrate_localizations or tuple(config.llc_localization * f for f in (0.1, 1.0, 10.0))
    cal = tld.calibrate_llc(ctx.model, data, step_sizes=steps, localizations=gammas, nbeta=config.llc_nbeta,
                            n_steps=config.llc_steps, n_burnin=config.llc_burnin, n_chains=config.llc_chains,
                            params=args.calibrate_params, seed=config.seed, progress=not args.no_progress)
    run = RunFolder(out)
    folder = run.llc / "calibration"
    cal.save(folder)
    cal.plot(folder / "calibration.png")
    run.record("calibrate", [run.relative(p) for p in folder.rglob("*") if p.is_file()])
    print(f"[tl-degeneracy] {cal}", file=sys.stderr)
    print(f"[tl-degeneracy] calibration: {folder / 'calibration.json'}, {folder / 'calibration.png'}",
          file=sys.stderr)
    return cal


def _cmd_calibrate(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.llc_burnin >= args.llc_steps:
        parser.error(f"--llc-burnin ({args.llc_burnin}) must be below --llc-steps ({args.llc_steps})")
    out = Path(args.out)
    RunFolder(out).claim()  # the calibration is written into a run folder: refuse anyone else's folder
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cal = _calibrate(args, _config_from(args), out)
    return 0 if cal.recommended is not None else 1


def _print_llc_warnings(out: Path) -> None:
    """Closing summary: every LLC estimate of the run that is not converged, with its reasons."""
    if not RunFolder(out).llc_summary.is_file():
        return
    lines = report.llc_warnings(out)
    if lines:
        print(f"[tl-degeneracy] warning: {len(lines)} LLC estimate(s) not converged (see the report's LLC section):",
              file=sys.stderr)
        for line in lines:
            print(f"[tl-degeneracy]   {line}", file=sys.stderr)


def _cmd_report(args: argparse.Namespace) -> int:
    path = report.write_report(args.dir)
    print(f"[tl-degeneracy] report: {path}", file=sys.stderr)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``tl-degeneracy``; returns the exit status (0 ok, 1 error, 2 usage, 130 interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help, --version (0) and usage errors (2)
        return int(exit_.code or 0)
    try:
        if args.command == "run":
            return _cmd_run(args, argv, parser)
        if args.command == "calibrate":
            return _cmd_calibrate(args, parser)
        return _cmd_report(args)
    except SystemExit as exit_:  # parser.error after parsing
        return int(exit_.code or 0)
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except (TLDegeneracyError, OSError) as err:
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as err:  # a file no reader mapped
        print(f"error: a file could not be read (corrupted or truncated?): {type(err).__name__}: "
              f"{' '.join(str(err).split())[:300]}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
