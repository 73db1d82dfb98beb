"""The default run's LLC on the bundled model, judged by the library's own verdict (issue 16).

The defaults (``RunConfig.llc_*``) were chosen with ``tld.calibrate_llc`` on the bundled model and the data the
default run samples (the grid, its timings and the reasoning are in benchmarks/RESULTS.md and RunConfig's
docstring). The fixture runs the default ``llc`` stage exactly as ``tl-degeneracy run`` does: the whole model and
each layer at the base nβ, then the whole model at the other nβ of the sweep. Slow: ~25–30 min of single-thread CPU
(7 estimates of 1000 steps, two of them sampled again with 2000), about an hour on the shared 2-core CPU under load.
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


def test_default_run_llc_estimates_at_the_base_nbeta_are_all_converged(default_run):
    # measured at the defaults (benchmarks/RESULTS.md, 2026-12-01): all 586.9 ± 2.7, blocks.0 176.9 ± 0.8,
    # blocks.1 20.5 ± 0.3 converged at 1000 steps; blocks.2 (plateau drift 3.6 s.e.) and blocks.3 (R̂ 1.18, ESS 19)
    # fail on mixing at 1000 steps and the stage samples them again at 2000: 14.95 ± 0.12 (R̂ 1.02), 13.14 ± 0.22
    # (R̂ 1.06, ESS 100), converged
    config = RunConfig()
    n_layers = tld.ModelAdapter(tld.load_model(str(tld.bundled_model_path()), device="cpu")).n_layers
    assert sorted(default_run.llc) == ["all"] + [f"blocks.{layer}" for layer in range(n_layers)]
    assert all(r.nbeta == config.llc_nbeta for r in default_run.llc.values())
    not_converged = {name: r.verdict for name, r in default_run.llc.items() if not r.converged}
    assert not not_converged, not_converged
    assert default_run.llc["all"].settings["n_steps"] == config.llc_steps  # the whole model needs no second try


def test_default_run_llc_sweep_estimates_are_converged(default_run):
    # the sweep scales γ with nβ (step·γ fixed): nβ/3 597.9 ± 2.7, 3nβ 582.7, both converged at 1000 steps
    config = RunConfig()
    assert [r.nbeta for r in default_run.llc_scale] == [config.llc_nbeta / 3, config.llc_nbeta, config.llc_nbeta * 3]
    not_converged = {f"all at nβ = {r.nbeta:g}": r.verdict for r in default_run.llc_scale if not r.converged}
    assert not not_converged, not_converged
    gammas = [r.settings["localization"] for r in default_run.llc_scale]
    assert gammas == pytest.approx([config.llc_localization / 3, config.llc_localization, config.llc_localization * 3])
