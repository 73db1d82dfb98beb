"""The LLC setup and stage: even batches, one setup per nβ sweep, one whole-model estimate at the base nβ."""

from __future__ import annotations

import pytest
import torch
from tiny import make_tiny_model, random_tokens

import tl_degeneracy as tld
import tl_degeneracy.llc.behavioral as behavioral
import tl_degeneracy.llc.sgld as sgld
from tl_degeneracy.adapter import ModelAdapter
from tl_degeneracy.llc.behavioral import _TeacherBatches, even_batches, llc_scale_sweep
from tl_degeneracy.run.cli import main

pytestmark = pytest.mark.tl3  # the model-facing LLC path: run on both TransformerLens majors

SGLD = dict(localization=100.0, n_chains=2, n_steps=6, n_burnin=2, progress=False)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model()


def test_sgld_sees_batches_of_even_size(model):
    # 9 rows at batch size 8 used to give an 8-row and a 1-row batch: every other SGLD step on one row.
    data = tld.token_batches(model, random_tokens(9, 12), batch_size=8)
    assert [b.tokens.shape[0] for b in data] == [8, 1]
    seen = [b.tokens.shape[0] for b in _TeacherBatches(ModelAdapter(model), data, "kl", True)]
    assert sorted(seen) == [4, 5]
    rows = torch.cat([b.tokens for b in even_batches(data)])
    assert torch.equal(rows, data.tokens)  # the same rows, in order
    even = tld.token_batches(model, random_tokens(16, 12), batch_size=8)
    assert even_batches(even) is even  # already even: untouched


def test_scale_sweep_builds_masks_model_and_teacher_once(model, monkeypatch):
    data = tld.token_batches(model, random_tokens(8, 12), batch_size=4)
    calls = {"masks": 0, "fm": 0, "teacher": 0}
    for name, key in (("parameter_masks", "masks"), ("FunctionalModel", "fm")):
        original = getattr(behavioral, name)

        def counted(*a, _original=original, _key=key, **k):
            calls[_key] += 1
            return _original(*a, **k)

        monkeypatch.setattr(behavioral, name, counted)
    prepare = _TeacherBatches._prepare

    def counted_prepare(self, b):
        calls["teacher"] += 1
        return prepare(self, b)

    monkeypatch.setattr(_TeacherBatches, "_prepare", counted_prepare)
    sweep = llc_scale_sweep(model, data, nbetas=[300.0, 1000.0, 3000.0], step_size=1e-4, params="blocks.0", **SGLD)
    assert len(sweep.results) == 3
    assert calls == {"masks": 1, "fm": 1, "teacher": 2}  # 2 batches, their θ* outputs computed once


def test_llc_stage_samples_the_whole_model_at_the_base_nbeta_once(tiny_gpt2_path, tmp_path, monkeypatch, capsys):
    seen = []
    original = sgld.sgld_llc

    def recording(*a, **k):
        seen.append((k["nbeta"], tuple(sorted(k["masks"] or {}))))
        return original(*a, **k)

    monkeypatch.setattr(behavioral, "sgld_llc", recording)
    tokens = tmp_path / "tokens.txt"
    tokens.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(60)))
    out = tmp_path / "run"
    args = ["run", "--model", tiny_gpt2_path, "--data", str(tokens), "--stages", "llc,report", "--seq-len", "16",
            "--llc-steps", "4", "--llc-burnin", "1", "--llc-chains", "2", "--llc-n-tokens", "60",
            "--llc-batch-size", "4", "--llc-nbetas", "3000,10000", "--llc-nbeta", "10000", "--layers", "0",
            "--no-progress", "--device", "cpu", "--threads", "1", "--out", str(out)]
    assert main(args) == 0
    assert len(seen) == len(set(seen)) == 3  # all and blocks.0 at 10⁴, all at 3000: nothing sampled twice
    sweep = tld.LLCScaleSweep.load(out / "llc" / "scale")
    whole = tld.LLCResult.load(out / "llc" / "all")
    assert [r.nbeta for r in sweep.results] == [3000.0, 10000.0]
    assert torch.equal(sweep.results[1].loss_trace, whole.loss_trace)
    # the sweep's other nβ keeps step·nβ and step·γ of the base estimate (γ scaled with nβ)
    base, other = whole.settings, sweep.results[0].settings
    assert other["localization"] == pytest.approx(base["localization"] * 3000.0 / 10000.0)
    assert other["step_size"] * 3000.0 == pytest.approx(base["step_size"] * 10000.0)
    # an LLC-only run's report states the whole-model λ̂ ± s.e. and its verdict; the command lists what failed
    index = (out / "index.md").read_text()
    assert f"λ̂ = {whole.llc_mean:.4g} ± {whole.llc_se:.2g} (s.e.)" in index and whole.verdict in index
    assert not whole.converged  # 3 draws per chain: nothing can be judged converged
    err = capsys.readouterr().err
    assert "LLC estimate(s) not converged" in err and "LLC 'all'" in err and "ESS" in err


def test_non_finite_weights_are_named_not_blamed_on_the_step_size(model):
    # issue 15 item 7: a NaN weight used to be reported as "chain 0 diverged ...: lower step_size".
    data = tld.token_batches(model, random_tokens(4, 12), batch_size=4)
    name, p = next((n, p) for n, p in model.named_parameters() if "mlp" in n and p.ndim == 2)
    with torch.no_grad():
        saved = p[0, 0].item()
        p[0, 0] = float("nan")
    try:
        with pytest.raises(tld.BadInputError, match="not finite") as err:
            tld.estimate_llc(model, data, nbeta=100.0, step_size=1e-4, **SGLD)
        assert "step_size" not in str(err.value) and "mlp" in str(err.value)
    finally:
        with torch.no_grad():
            p[0, 0] = saved


def test_non_finite_loss_or_gradient_at_w_star_is_named():
    # finite weights, but the loss is NaN at w* itself (log of 0): the data or loss_fn is at fault, not the step
    with pytest.raises(tld.BadInputError, match="at w\\*"):
        sgld.sgld_llc(lambda p, _: torch.log(p["w"]).sum(), {"w": torch.zeros(3)}, None, nbeta=10.0,
                      step_size=1e-3, loss_at_optimum=0.0, **SGLD)
    with pytest.raises(tld.BadInputError, match="gradient at w\\*"):
        sgld.sgld_llc(lambda p, _: torch.sqrt(p["w"]).sum(), {"w": torch.zeros(3)},
                      None, nbeta=10.0, step_size=1e-3, loss_at_optimum=0.0, **SGLD)


def test_chain_noise_depends_on_seed_and_chain_only():
    # chain c draws from a generator seeded by (seed, c): how many chains run, or how they are grouped
    # (batched, one by one, later: over processes), does not change its draws.
    h = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    kw = dict(nbeta=100.0, step_size=1e-3, localization=1.0, n_steps=60, n_burnin=10, seed=3, progress=False,
              loss_at_optimum=0.0, vectorize=False)
    one = sgld.sgld_llc(lambda p, _: 0.5 * (h * p["w"] ** 2).sum(), {"w": torch.zeros(3, dtype=torch.float64)},
                        None, n_chains=1, **kw)
    three = sgld.sgld_llc(lambda p, _: 0.5 * (h * p["w"] ** 2).sum(), {"w": torch.zeros(3, dtype=torch.float64)},
                          None, n_chains=3, **kw)
    assert torch.equal(one.loss_trace[0], three.loss_trace[0])
    assert not torch.equal(three.loss_trace[0], three.loss_trace[1])


def _stage_args(tiny_gpt2_path, tmp_path, out):
    text = tmp_path / "code.txt"
    if not text.exists():
        text.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(60)))
    return ["run", "--model", tiny_gpt2_path, "--data", str(text), "--stages", "llc", "--seq-len", "16",
            "--llc-steps", "4", "--llc-burnin", "1", "--llc-chains", "2", "--llc-n-tokens", "60",
            "--llc-batch-size", "4", "--llc-nbetas", "3000,10000,30000", "--llc-nbeta", "10000",
            "--no-progress", "--device", "cpu", "--threads", "1", "--out", str(out)]


def test_interrupted_llc_stage_resumes_without_recomputing(tiny_gpt2_path, tmp_path, monkeypatch):
    # 5 estimates: all, blocks.0, blocks.1 at nβ = 10⁴, then all at 3000 and 30000. Interrupt after two.
    calls = []
    original = tld.estimate_llc

    def interrupting(*a, **k):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append((k["params"], k["nbeta"]))
        return original(*a, **k)

    monkeypatch.setattr(tld, "estimate_llc", interrupting)
    out = tmp_path / "run"
    assert main(_stage_args(tiny_gpt2_path, tmp_path, out)) != 0  # the command reports the interrupt
    assert calls == [("all", 10000.0), ("blocks.0", 10000.0)]
    progress = out / ".progress" / "llc" / "llc"  # finished estimates wait here; nothing is in place yet
    finished = {sel: tld.LLCResult.load(progress / sel) for sel in ("all", "blocks.0")}
    assert not (out / "llc").exists()

    calls.clear()
    monkeypatch.setattr(tld, "estimate_llc", lambda *a, **k: (calls.append((k["params"], k["nbeta"])),
                                                              original(*a, **k))[1])
    assert main(_stage_args(tiny_gpt2_path, tmp_path, out)) == 0
    assert calls == [("blocks.1", 10000.0), ("all", 3000.0), ("all", 30000.0)]  # the first two were loaded
    for sel, before in finished.items():  # the results computed before the interrupt are the ones in place
        assert torch.equal(tld.LLCResult.load(out / "llc" / sel).loss_trace, before.loss_trace)
    assert not (out / ".progress").exists()

    whole = tmp_path / "whole"
    assert main(_stage_args(tiny_gpt2_path, tmp_path, whole)) == 0
    for sel in ("all", "blocks.0", "blocks.1", "scale/run_000", "scale/run_001", "scale/run_002"):
        a, b = tld.LLCResult.load(out / "llc" / sel), tld.LLCResult.load(whole / "llc" / sel)
        assert torch.equal(a.loss_trace, b.loss_trace) and a.llc_mean == b.llc_mean, sel
    assert not list((out / "llc").glob("**/*.partial")) and not list((out / "llc").glob("**/*.old"))


def test_needs_longer_chains_only_for_mixing_failures():
    from tl_degeneracy.llc.diagnostics import needs_longer_chains

    healthy = {"mala_acceptance": [0.95, 0.94], "r_hat_rank": 1.01, "ess_bulk": 400.0,
               "plateau_test": {"ok": True}, "dropped_chains": []}
    assert not needs_longer_chains(healthy)  # converged
    assert needs_longer_chains({**healthy, "r_hat_rank": 1.18})
    assert needs_longer_chains({**healthy, "ess_bulk": 19.0})
    assert needs_longer_chains({**healthy, "plateau_test": {"ok": False, "drift": 1.0, "z": 4.0}})
    assert not needs_longer_chains({**healthy, "r_hat_rank": 1.18, "mala_acceptance": [0.7, 0.8]})  # step too big
    assert not needs_longer_chains({**healthy, "r_hat_rank": 1.18, "dropped_chains": [1]})


def test_llc_stage_samples_a_poorly_mixed_estimate_again_with_twice_the_steps(tiny_gpt2_path, tmp_path,
                                                                               monkeypatch):
    # Estimates 'all' then 'blocks.0' (one nβ). The verdict check says 'blocks.0' mixed poorly once: the stage
    # samples it again with 2× the steps (within --llc-max-steps) and keeps that result; a rerun loads it.
    import tl_degeneracy.run.pipeline as pipeline

    calls, checks = [], []
    original = tld.estimate_llc
    monkeypatch.setattr(tld, "estimate_llc", lambda *a, **k: (calls.append((k["params"], k["n_steps"])),
                                                              original(*a, **k))[1])
    monkeypatch.setattr(pipeline, "needs_longer_chains", lambda diag: (checks.append(1), len(checks) == 2)[1])
    out = tmp_path / "run"
    args = [*_stage_args(tiny_gpt2_path, tmp_path, out), "--layers", "0", "--llc-nbetas", "10000",
            "--llc-max-steps", "16"]
    assert main(args) == 0
    assert calls == [("all", 4), ("blocks.0", 4), ("blocks.0", 8)]
    assert tld.LLCResult.load(out / "llc" / "blocks.0").settings["n_steps"] == 8
    assert tld.LLCResult.load(out / "llc" / "all").settings["n_steps"] == 4
    calls.clear()
    assert main(args) == 0
    assert calls == []  # everything loaded, the longer attempt included
