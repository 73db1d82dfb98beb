"""Data-parallel ``collect`` over 2 gloo processes (torch.multiprocessing spawn, 1 thread each) against the
single-process run, failure on one rank, and resume with another world size.

Summation-order bound: every per-batch increment x_i is a float32 number held exactly in float64, so the only
difference between two orders of adding n increments is float64 rounding. Recursive summation in any order
has |computed − exact| ≤ (n − 1)·u·Σ|x_i| (u = 2⁻⁵³, to first order), so two orders differ by at most
2(n − 1)·u·Σ|x_i|; the test checks every entry against that bound (with Σ|x_i| measured per entry).
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import traceback
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny import make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.adapter import as_adapter
from tl_degeneracy.collection import distributed as tdist
from tl_degeneracy.collection.collect import _components
from tl_degeneracy.collection.engine import accurate_matmuls, run_batch
from tl_degeneracy.errors import BadInputError, NonFiniteError

SETTINGS = dict(sites=["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out"], jacobian="kl", n_probes=2,
                head_sync=True, neuron_sync=True, seed=3, progress=False, memory_budget=None)
N_ROWS, SEQ, BATCH = 10, 12, 2  # 5 batches: an uneven last round on 2 ranks
U = 2.0**-53


def _teardown() -> None:
    """Leave the process group together: a rank that exits while its peer's gloo connection still carries the last
    collective's messages makes the peer abort ("terminate called without an active exception", seen under load).
    A monitored barrier (gloo) first, bounded so that a rank stuck elsewhere cannot hang the test.

    Then a worker that finished (no exception on its way out) leaves with ``os._exit(0)``, skipping the
    interpreter's shutdown: one CI run (2026-12-01) still saw both ranks abort with that message despite the
    barrier, in a run of the ablation test not reproduced here in 27 tries with and without load; where it
    happened is not known, and gloo's threads meeting interpreter finalization is a known cause of such aborts,
    so that step is left out. A worker that is raising takes the normal exit, so its error reaches the parent."""
    raising = sys.exc_info()[0] is not None
    try:
        dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
    except RuntimeError:
        pass
    dist.destroy_process_group()
    if not raising:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _data(model):
    return tld.token_batches(model, random_tokens(N_ROWS, SEQ, seed=1), batch_size=BATCH)


def _worker(rank: int, world: int, folder: str) -> None:
    """Three jobs in one process group: a full run, a run where rank 1 fails at batch 3, and a resume of the
    single-process checkpoint ``single-ckpt``. Each rank saves what it returned (or the error it raised)."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = make_tiny_model()
        real = tdist.run_batch

        def failing(adapter, comps, batch, seed, **kw):
            if batch.index == 3:
                raise NonFiniteError(f"NaN injected at batch {batch.index}")
            return real(adapter, comps, batch, seed, **kw)

        for job, ckpt, resume in (("full", "full-ckpt", False), ("fail", "fail-ckpt", False),
                                  ("resume", "single-ckpt", True)):
            tdist.run_batch = failing if job == "fail" else real
            try:
                stats = tld.collect(model, _data(model), checkpoint=f"{folder}/{ckpt}.safetensors",
                                    checkpoint_every=2, resume=resume, **SETTINGS)
                stats.save(f"{folder}/{job}-rank{rank}.safetensors")
            except Exception as err:  # noqa: BLE001 - the parent checks what each rank raised
                Path(f"{folder}/{job}-rank{rank}.error").write_text(f"{type(err).__name__}: {err}")
    except BaseException:
        Path(f"{folder}/crash-rank{rank}").write_text(traceback.format_exc())
        raise
    finally:
        _teardown()


def _abs_sums(model) -> dict[str, torch.Tensor]:
    """Σ_i |x_i| per entry over the per-batch increments (for the summation-order bound)."""
    adapter = as_adapter(model)
    layers = list(range(adapter.n_layers))
    comps = _components(adapter, SETTINGS["sites"], jacobian="kl", estimator="probe", n_probes=2,
                        precision="accurate", head_layers=layers, neuron_layers=layers)
    out: dict[str, torch.Tensor] = {}
    with adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
        for batch in _data(model):
            for k, v in run_batch(adapter, comps, batch, SETTINGS["seed"]).items():
                out[k] = out.get(k, 0) + v.detach().double().abs()
    return out


def _assert_same_totals(a: tld.Stats, b: tld.Stats, abs_sums: dict[str, torch.Tensor], n: int) -> None:
    assert set(a.tensors) == set(b.tensors)
    assert a.n_tokens == b.n_tokens and a.meta["batches_done"] == b.meta["batches_done"]
    for key, x in a.tensors.items():
        y = b.tensors[key]
        if not x.is_floating_point():
            assert torch.equal(x, y), key  # counts identical
            continue
        bound = 2 * (n - 1) * U * abs_sums[key] * (1 + 1e-6)
        assert bool(((x - y).abs() <= bound).all()), f"{key}: {(x - y).abs().max()} > bound"


def test_two_process_collect_equals_single_process_and_resumes_across_world_sizes(tmp_path):
    import tl_degeneracy.collection.engine as engine

    model = make_tiny_model()
    single = tld.collect(model, _data(model), **SETTINGS)
    abs_sums = _abs_sums(model)
    n_batches = len(_data(model))

    # a single-process run stopped by a NaN at batch 3 leaves a checkpoint of batches 0-1 (resumed on 2 ranks)
    real = engine.run_batch

    def failing(adapter, comps, batch, seed, **kw):
        if batch.index == 3:
            raise NonFiniteError("NaN injected")
        return real(adapter, comps, batch, seed, **kw)

    engine.run_batch = failing
    try:
        with pytest.raises(NonFiniteError):
            tld.collect(model, _data(model), checkpoint=tmp_path / "single-ckpt.safetensors", checkpoint_every=2,
                        **SETTINGS)
    finally:
        engine.run_batch = real
    assert tld.Stats.load(tmp_path / "single-ckpt.safetensors").meta["batches_done"] == 2

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=True)

    # 2 processes, uninterrupted: every rank returns the same Stats, equal to the single-process run
    r0 = tld.Stats.load(tmp_path / "full-rank0.safetensors")
    r1 = tld.Stats.load(tmp_path / "full-rank1.safetensors")
    for key in r0.tensors:
        assert torch.equal(r0.tensors[key], r1.tensors[key])
    _assert_same_totals(single, r0, abs_sums, n_batches)
    assert r0.meta["jacobian"] == single.meta["jacobian"] and r0.meta["data"] == single.meta["data"]

    # rank 1 failed at batch 3 (round 2-3): every rank stopped, rank 0 names rank 1, checkpoint holds 2 batches
    err0 = (tmp_path / "fail-rank0.error").read_text()
    assert err0.startswith("RankFailedError: rank 1 of 2 failed with NonFiniteError: NaN injected at batch 3")
    assert (tmp_path / "fail-rank1.error").read_text().startswith("NonFiniteError")
    assert tld.Stats.load(tmp_path / "fail-ckpt.safetensors").meta["batches_done"] == 2
    # ... and resumed in one process: the uninterrupted totals
    resumed = tld.collect(model, _data(model), checkpoint=tmp_path / "fail-ckpt.safetensors", resume=True,
                          **SETTINGS)
    _assert_same_totals(single, resumed, abs_sums, n_batches)

    # the single-process checkpoint resumed on 2 ranks: the uninterrupted totals on both
    for rank in range(2):
        _assert_same_totals(single, tld.Stats.load(tmp_path / f"resume-rank{rank}.safetensors"), abs_sums,
                            n_batches)


def test_shard_is_disjoint_and_covers_everything():
    items = list(range(11))
    parts = [list(tdist.shard(items, start=3, ctx=tdist.DistContext(r, 3, "gloo"))) for r in range(3)]
    assert sorted(sum(parts, [])) == items[3:]
    assert parts[1] == [4, 7, 10]
    assert list(tdist.shard(items)) == items  # no process group: everything


@pytest.mark.parametrize("bad", ["yes", 1.5])
def test_distributed_flag_is_checked(tiny_model, bad):
    with pytest.raises(BadInputError, match="distributed must be"):
        tld.collect(tiny_model, _data(tiny_model), sites=["resid_pre"], distributed=bad, progress=False)


def test_distributed_true_without_torchrun_says_how_to_launch(tiny_model, monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(BadInputError, match="torchrun"):
        tld.collect(tiny_model, _data(tiny_model), sites=["resid_pre"], distributed=True, progress=False)


LLC = dict(params="blocks.1", nbeta=1000.0, step_size=1e-4, localization=100.0, n_steps=8, n_burnin=4,
           progress=False)


def _llc_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model = make_tiny_model()
        data = tld.token_batches(model, random_tokens(4, 8, seed=2), batch_size=2)
        res = tld.estimate_llc_distributed(model, data, n_chains=3, seed=5, **LLC)
        res.save(f"{folder}/llc-rank{rank}")
        sweep = tld.llc_scale_sweep_distributed(model, data, nbetas=[500.0, 1000.0, 2000.0], n_chains=2,
                                                **{k: v for k, v in LLC.items() if k != "nbeta"})
        sweep.save(f"{folder}/sweep-rank{rank}")
    finally:
        _teardown()


def test_chain_parallel_llc_on_two_ranks_equals_single_process(tmp_path):
    mp.spawn(_llc_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(4, 8, seed=2), batch_size=2)
    single = tld.estimate_llc_distributed(model, data, n_chains=3, seed=5, **LLC)
    sweep = tld.llc_scale_sweep(model, data, nbetas=[500.0, 1000.0, 2000.0], n_chains=2,
                                **{k: v for k, v in LLC.items() if k != "nbeta"})
    for rank in range(2):
        res = tld.LLCResult.load(tmp_path / f"llc-rank{rank}")
        # same chains, same seeds, same CPU arithmetic: bit-identical per-chain estimates and traces
        assert torch.equal(res.llc_per_chain, single.llc_per_chain)
        assert torch.equal(res.loss_trace, single.loss_trace)
        assert res.llc_mean == single.llc_mean and res.settings["world_size"] == 2
        got = tld.LLCScaleSweep.load(tmp_path / f"sweep-rank{rank}")
        for a, b in zip(got.results, sweep.results, strict=True):
            assert torch.equal(a.llc_per_chain, b.llc_per_chain)
    # chain c's seed does not depend on the number of chains: the first 2 of 3 chains are the 2-chain run
    two = tld.estimate_llc_distributed(model, data, n_chains=2, seed=5, **LLC)
    assert torch.equal(two.llc_per_chain, single.llc_per_chain[:2])
    assert single.settings["world_size"] == 1 and single.n_chains == 3
    # and the chains are those of plain estimate_llc with the same seed (run one by one: same arithmetic)
    plain = tld.estimate_llc(model, data, n_chains=3, seed=5, vectorize=False, **LLC)
    assert torch.equal(plain.llc_per_chain, single.llc_per_chain)


CLI_BUDGET = ["--seq-len", "16", "--n-tokens", "300", "--batch-size", "8", "--n-probes", "2", "--llc-steps", "6",
              "--llc-burnin", "2", "--llc-chains", "2", "--llc-n-tokens", "40", "--llc-batch-size", "4",
              "--llc-nbetas", "3000,10000", "--no-sync", "--layers", "0,1", "--no-progress", "--device", "cpu",
              "--threads", "1", "--ablate-n-tokens", "64", "--no-graph"]  # small stages on rank 0 alone


def _summary_rows(folder: Path) -> list[dict[str, str]]:
    import csv

    with open(folder / "summary.csv") as f:
        return list(csv.DictReader(f))


def test_torchrun_cli_on_the_bundled_model_writes_the_single_process_summary(tmp_path):
    import json
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "tl_degeneracy", "run", *CLI_BUDGET, "--out", str(one)], env=env,
                   check=True, capture_output=True)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "-m", "tl_degeneracy", "run", *CLI_BUDGET, "--out", str(two)], env=env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = json.loads((two / "run.json").read_text())
    assert run["distributed"] == {"world_size": 2, "backend": "gloo"} and run["result"] == "ok"
    assert json.loads((one / "run.json").read_text())["distributed"]["world_size"] == 1
    a, b = _summary_rows(one), _summary_rows(two)
    assert len(a) == len(b) and a[0].keys() == b[0].keys()
    for ra, rb in zip(a, b, strict=True):
        for key, x in ra.items():
            y = rb[key]
            try:
                fx, fy = float(x), float(y)
            except ValueError:
                assert x == y, key
                continue
            # counts and dimensions exact; values derived from float64 totals summed in another order:
            # relative rounding ~1e-16 per operation, amplified at most by the eigen-solver's conditioning
            same = fx == fy or (math.isnan(fx) and math.isnan(fy))  # an s.e. of 2 chains may be NaN in both
            assert same or abs(fx - fy) <= 1e-9 * max(abs(fx), abs(fy)), (key, x, y)
    assert not list(two.glob("**/*.rank*")), "only rank 0 writes into the run folder"


# ---- ablation passes shard over batches too -----------------------------------------------------------------
def _ablation_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model, data, bases, site = _ablation_setup()
        curves = tld.ablation_curves(model, data, bases, site=site, loss="kl", progress=False)
        for kind, curve in curves.items():
            curve.save(f"{folder}/{kind}-rank{rank}")
        real = tld.collection.ablation.accurate_matmuls  # a failure on rank 1 only: every rank stops

        def failing(*a, **k):
            if rank == 1:
                raise NonFiniteError("NaN injected on rank 1")
            return real(*a, **k)

        tld.collection.ablation.accurate_matmuls = failing
        try:
            tld.measure_loss(model, data, bases["pca"].ablation_hooks(site, keep=2))
        except Exception as err:  # noqa: BLE001 - the parent checks what each rank raised
            Path(f"{folder}/fail-rank{rank}.error").write_text(f"{type(err).__name__}: {err}")
    finally:
        _teardown()


def _ablation_setup():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(7, 10, seed=4), batch_size=2)  # 4 batches, the last short
    site = "blocks.1.hook_resid_pre"
    stats = tld.collect(model, data, sites=[site], jacobian="kl", n_probes=2, progress=False)
    bases = {"interaction": tld.interaction_basis(stats.gram(site), stats.jacobian_gram(site), mean=stats.mean(site)),
             "pca": tld.pca_basis(stats.gram(site), mean=stats.mean(site))}
    return model, data, bases, site


def test_ablation_curves_on_two_ranks_equal_the_single_process_curves(tmp_path):
    """Each rank measures every other batch; the all-reduced float64 sums equal one process's up to summation
    order (a few ulps of the totals); a failure on one rank stops both, rank 0 naming it."""
    mp.spawn(_ablation_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model, data, bases, site = _ablation_setup()
    single = tld.ablation_curves(model, data, bases, site=site, loss="kl", progress=False)
    for kind, curve in single.items():
        for rank in range(2):
            got = tld.AblationCurve.load(tmp_path / f"{kind}-rank{rank}")
            assert got.keep == curve.keep and got.n_tokens == curve.n_tokens
            assert torch.allclose(got.loss, curve.loss, rtol=1e-12, atol=1e-15), kind
    assert "RankFailedError: rank 1 of 2" in (tmp_path / "fail-rank0.error").read_text()
    assert "NaN injected on rank 1" in (tmp_path / "fail-rank1.error").read_text()


def _graph_worker(rank: int, world: int, folder: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        model, data, sites, stats = _graph_setup()
        bases = tld.local_interaction_bases(model, data, sites, stats=stats, n_probes=2, seed=1)
        graph = tld.interaction_graph(model, data, bases, sites, method="integrated", n_points=2,
                                      estimator="probe", n_probes=2, seed=1)
        graph.save(f"{folder}/graph-rank{rank}")
    finally:
        _teardown()


def _graph_setup():
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(5, 8, seed=6), batch_size=2)  # 3 batches: uneven over 2 ranks
    sites = ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre", "blocks.1.hook_resid_post"]
    stats = tld.collect(model, data, sites=sites, jacobian="kl", n_probes=2, progress=False)
    return model, data, sites, stats


def test_interaction_graph_on_two_ranks_equals_the_single_process_graph(tmp_path):
    """LIB Grams and edges are sums over batches with probes seeded per batch: 2 ranks give the single
    process's graph up to float64 summation order (the bases are eigen-decompositions of those sums, so a
    relative 1e-9 covers their conditioning here)."""
    mp.spawn(_graph_worker, args=(2, str(tmp_path)), nprocs=2, join=True)
    model, data, sites, stats = _graph_setup()
    bases = tld.local_interaction_bases(model, data, sites, stats=stats, n_probes=2, seed=1)
    single = tld.interaction_graph(model, data, bases, sites, method="integrated", n_points=2,
                                   estimator="probe", n_probes=2, seed=1)
    for rank in range(2):
        got = tld.InteractionGraph.load(tmp_path / f"graph-rank{rank}")
        for pair, edges in single.edges.items():
            assert got.edges[pair].shape == edges.shape
            assert torch.allclose(got.edges[pair], edges, rtol=1e-9, atol=1e-12 * float(edges.abs().max())), pair
