"""Calibration of the SGLD step size and localization (issue 16): on analytic targets the recommended step lies
in the flat region and gives the analytic λ; on a model the API, plot and files work."""

from __future__ import annotations

import math

import pytest
import torch
from test_llc_analytic import aoyagi_rrr
from tiny import make_tiny_model, random_tokens

import tl_degeneracy as tld
from tl_degeneracy.llc.calibrate import LLCCalibration, calibrate
from tl_degeneracy.llc.sgld import LLCResult, sgld_llc

H = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)


@pytest.mark.slow
def test_calibration_on_the_quadratic_recommends_a_step_in_the_flat_region():
    # a = nβh + γ = 101, 201, 401. Small steps mix too slowly for 1500 steps (not converged: R̂, ESS); 3e-3 and
    # 6e-3 have εa/4 up to 0.3 and 0.6 (acceptance 0.90, 0.75: not converged). Measured once: 3e-4 and 1e-3
    # converged and agree, so 1e-3 is recommended.
    nbeta = 100.0
    cal = calibrate(
        lambda e, g: sgld_llc(lambda p, _: 0.5 * (H * p["w"] ** 2).sum(), {"w": torch.zeros(3, dtype=torch.float64)},
                              None, nbeta=nbeta, step_size=e, localization=g, n_steps=1500, n_burnin=300,
                              loss_at_optimum=0.0, progress=False),
        step_sizes=[3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 6e-3], localizations=[1.0], nbeta=nbeta)
    rec = cal.recommended
    assert rec is not None and rec["localization"] == 1.0
    a = nbeta * H + 1.0
    eps = rec["step_size"]
    exact = float((nbeta / 2 * H / (a * (1 - eps * a / 4))).sum())  # the finite-step formula of test_llc_analytic
    continuous = float((nbeta / 2 * H / a).sum())  # 1.4925
    assert abs(rec["llc"] - exact) < 4 * rec["llc_se"]
    assert abs(rec["llc"] / continuous - 1) < 0.10  # the recommended step's bias is small
    assert eps < 3e-3 and cal.flat[0, cal.step_sizes.index(eps)]  # the biased, low-acceptance steps are refused
    assert not cal.converged[0, -1] and "acceptance" in cal.verdicts[0][-1]


@pytest.mark.slow
def test_calibration_on_reduced_rank_regression_recovers_aoyagi():
    # K = ½‖BA‖², (M, H, N) = (5, 3, 5): Aoyagi's λ = 6.5; at nβ = 100 long runs gave 6.17 ± 0.06 (see
    # test_llc_analytic); 10% as there.
    M, Hd, N = 5, 3, 5
    truth = aoyagi_rrr(M, Hd, N, 0)
    w0 = {"A": torch.zeros(Hd, M, dtype=torch.float64), "B": torch.zeros(N, Hd, dtype=torch.float64)}
    cal = calibrate(
        lambda e, g: sgld_llc(lambda p, _: 0.5 * ((p["B"] @ p["A"]) ** 2).sum(),
                              w0, None, nbeta=100.0, step_size=e, localization=g, n_steps=1500, n_burnin=500,
                              loss_at_optimum=0.0, progress=False),
        step_sizes=[1e-4, 3e-4, 1e-3, 3e-3, 1e-2], localizations=[1.0], nbeta=100.0)
    rec = cal.recommended
    assert rec is not None and abs(rec["llc"] / truth - 1) < 0.10, (cal.rows(), truth)
    assert rec["step_size"] < 3e-3  # acceptance 0.83 there: refused


@pytest.mark.tl3
def test_calibrate_llc_on_a_model_writes_table_and_heat_map(tmp_path):
    model = make_tiny_model()
    data = tld.token_batches(model, random_tokens(8, 12), batch_size=4)
    cal = tld.calibrate_llc(model, data, step_sizes=[1e-5, 1e-4], localizations=[100.0, 1000.0], nbeta=300.0,
                            n_steps=24, n_burnin=8, n_chains=2, params="blocks.0", progress=False)
    assert isinstance(cal, LLCCalibration) and cal.llc.shape == (2, 2) and len(cal.rows()) == 4
    assert all(v == "converged" or v.startswith("not converged:") for row in cal.verdicts for v in row)
    assert torch.isfinite(cal.llc).all() and math.isfinite(float(cal.acceptance.mean()))
    cal.save(tmp_path)
    back = LLCCalibration.load(tmp_path)
    assert back.rows() == cal.rows() and back.recommended == cal.recommended
    cal.plot(tmp_path / "calibration.png")
    assert (tmp_path / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert cal.recommended is None or cal.recommended["step_size"] in cal.step_sizes
    with pytest.raises(tld.BadInputError, match="step_sizes"):
        tld.calibrate_llc(model, data, step_sizes=[], localizations=[1.0], nbeta=10.0)


def test_calibrate_command_and_run_with_llc_calibrate(tiny_gpt2_path, tmp_path, capsys, monkeypatch):
    from tl_degeneracy.run.cli import main

    text = tmp_path / "code.txt"
    text.write_text("".join(f"def f{i}(x):\n    return x + {i}\n" for i in range(60)))
    common = ["--model", tiny_gpt2_path, "--data", str(text), "--seq-len", "16", "--llc-steps", "12",
              "--llc-burnin", "4", "--llc-chains", "2", "--llc-n-tokens", "60", "--llc-batch-size", "4",
              "--llc-nbeta", "1000", "--calibrate-step-sizes", "1e-6,1e-5", "--calibrate-localizations", "100",
              "--no-progress", "--device", "cpu", "--threads", "1"]
    out = tmp_path / "cal"
    code = main(["calibrate", *common, "--out", str(out)])
    cal = LLCCalibration.load(out / "llc" / "calibration")
    assert code == (0 if cal.recommended is not None else 1)
    assert (out / "llc" / "calibration" / "calibration.png").is_file()
    assert cal.step_sizes == [1e-6, 1e-5] and cal.localizations == [100.0]
    assert "LLC calibration at nβ = 1000" in capsys.readouterr().err

    # 8 draws per chain never pass the ESS check, so no cell is converged: the run must refuse to guess
    assert cal.recommended is None
    run_args = ["run", *common, "--stages", "llc", "--llc-nbetas", "1000", "--layers", "0", "--llc-calibrate"]
    assert main([*run_args, "--out", str(tmp_path / "refused")]) == 1
    assert "--calibrate-step-sizes" in capsys.readouterr().err

    # the wiring of a recommendation into the run: a calibration that recommends (1e-5, 100)
    original = tld.calibrate_llc

    def recommending(*a, **k):
        cal = original(*a, **k)
        cal.recommended = {"step_size": 1e-5, "localization": 100.0, "llc": 0.0, "llc_se": 0.0}
        return cal

    monkeypatch.setattr(tld, "calibrate_llc", recommending)
    run_out = tmp_path / "run"
    assert main([*run_args, "--llc-step-size", "3e-4", "--llc-localization", "5", "--out", str(run_out)]) == 0
    used = tld.LLCResult.load(run_out / "llc" / "all").settings
    assert used["step_size"] == 1e-5 and used["localization"] == 100.0


def _cell_result(llc: float, se: float, verdict: str = "converged") -> LLCResult:
    """A stand-in LLCResult with the fields calibrate() reads (λ̂, its s.e., acceptance, R̂, verdict)."""
    return LLCResult(llc_mean=llc, llc_std=float("nan"), llc_per_chain=torch.full((4,), llc),
                     loss_trace=torch.zeros(4, 1), eps_hat=llc / 100.0, n_eff=2 * llc, nbeta=100.0,
                     loss_at_optimum=0.0, n_burnin=0,
                     diagnostics={"verdict": verdict, "llc_se": se, "mala_acceptance": [0.95] * 4, "r_hat_rank": 1.01})


def test_a_cell_too_noisy_to_compare_is_not_flat_and_not_recommended():
    # Measured on modadd-113's MLP (nβ = 12769, γ = 300, 4 chains, 1000/500 steps): ε = 1e-5 gave 6.47 ± 0.16 and
    # ε = 3e-5 10.57 ± 2.66 (one chain's excursion into the loss wall: per-chain 18.4, 7.0, 9.1, 7.8), both
    # "converged". |Δ| = 4.1 is within 3 combined s.e. (8.0) only because the larger step is noisy: agreement that
    # could not have seen a 60% step-size bias is no evidence of flatness.
    table = {(1e-5, 300.0): (6.47, 0.16), (3e-5, 300.0): (10.57, 2.66)}
    cal = calibrate(lambda e, g: _cell_result(*table[(e, g)]), step_sizes=[1e-5, 3e-5], localizations=[300.0],
                    nbeta=12769.0)
    assert not bool(cal.flat[0, 1])
    assert cal.recommended is None
    # two precise cells that agree are flat, and the larger step is recommended
    table[(3e-5, 300.0)] = (6.60, 0.20)
    cal = calibrate(lambda e, g: _cell_result(*table[(e, g)]), step_sizes=[1e-5, 3e-5], localizations=[300.0],
                    nbeta=12769.0)
    assert cal.flat.tolist() == [[True, True]] and cal.recommended["step_size"] == 3e-5
    # a precise cell that disagrees by more than 3 s.e. and 5% is not flat
    table[(3e-5, 300.0)] = (7.50, 0.20)
    cal = calibrate(lambda e, g: _cell_result(*table[(e, g)]), step_sizes=[1e-5, 3e-5], localizations=[300.0],
                    nbeta=12769.0)
    assert not bool(cal.flat[0, 1]) and cal.recommended is None
