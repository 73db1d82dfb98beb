"""The default run's LLC on the bundled model, judged by the library's own verdict (issue 16).

The defaults (``RunConfig.llc_*``) were chosen with ``tld.calibrate_llc`` on the bundled model and the data the
default run samples (the grid, its timings and the reasoning are in benchmarks/RESULTS.md and RunConfig's
docstring). The fixture runs the default ``llc`` stage exactly as ``tl-degeneracy run`` does: the whole model and
each layer at the base nβ, then the whole model at the other nβ of the sweep. Slow: ~45 min on the shared
2-core CPU under load, ~13 min of single-thread CPU.
"""

from __future__ import annotations

import sys
import time

import pytest

import tl_degeneracy as tld
from tl_degeneracy.run import report
from tl_degeneracy.run.pipeline import RunConfig, run_stages

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("default-llc")
    start = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f} s] {message}", file=sys.stderr, flush=True)

    run_stages(RunConfig(), out, ["llc"], progress=False, log=log)
    return report.load_results(out)


def test_default_run_llc_whole_model_and_early_layers_are_converged(default_run):
    # measured at the defaults (benchmarks/RESULTS.md): all 581.1 ± 1.3, blocks.0 178.2 ± 0.7, blocks.1 20.5 ± 0.3,
    # all converged (acceptance 0.93-0.95, R̂ 1.015-1.090, bulk ESS 106-1056)
    config = RunConfig()
    n_layers = tld.ModelAdapter(tld.load_model(str(tld.bundled_model_path()), device="cpu")).n_layers
    assert sorted(default_run.llc) == ["all"] + [f"blocks.{layer}" for layer in range(n_layers)]
    assert all(r.nbeta == config.llc_nbeta for r in default_run.llc.values())
    checked = {name: default_run.llc[name] for name in ("all", "blocks.0", "blocks.1")}
    not_converged = {name: r.verdict for name, r in checked.items() if not r.converged}
    assert not not_converged, not_converged


@pytest.mark.xfail(strict=True, reason=(
    "blocks.2 and blocks.3 are 'not converged' at the defaults: R̂ 1.15 and 1.17 (one chain stays ~10% above the "
    "others for all 200 draws; 500 draws of blocks.3 gave R̂ 1.18, ESS 19), a mode slower than any affordable "
    "chain; see benchmarks/RESULTS.md"))
def test_default_run_llc_estimates_at_the_base_nbeta_are_all_converged(default_run):
    not_converged = {name: r.verdict for name, r in default_run.llc.items() if not r.converged}
    assert not not_converged, not_converged


@pytest.mark.xfail(strict=True, reason=(
    "the sweep keeps γ and step·nβ fixed, so at nβ/3 the step is 3× the calibrated one (step·γ = 0.03: MALA "
    "acceptance 0.83, measured) and at 3nβ it is 1/3 (step·γ = 0.0033: R̂ 1.106 and a plateau drift of 4.4 s.e., "
    "the burn-in is one equilibration time); see benchmarks/RESULTS.md (LLC calibration of the bundled model)"))
def test_default_run_llc_sweep_estimates_are_converged(default_run):
    config = RunConfig()
    assert [r.nbeta for r in default_run.llc_scale] == [config.llc_nbeta / 3, config.llc_nbeta, config.llc_nbeta * 3]
    not_converged = {f"all at nβ = {r.nbeta:g}": r.verdict for r in default_run.llc_scale if not r.converged}
    assert not not_converged, not_converged
