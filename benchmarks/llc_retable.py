"""Table of saved LLC results with this checkout's diagnostics (standard error, plateau test, verdict) recomputed
from their traces.

    python benchmarks/llc_retable.py runs/llc-default/*
"""

from __future__ import annotations

import sys

import tl_degeneracy as tld
from tl_degeneracy.llc import diagnostics


def row(path: str) -> str:
    r = tld.LLCResult.load(path)
    d = dict(r.diagnostics)
    paired = r.nbeta * (r.loss_trace[:, r.n_burnin:] - r.loss_at_optimum)
    d["llc_se"] = diagnostics.llc_standard_error(paired)
    d["plateau_test"] = diagnostics.plateau_test(paired)
    ok, reasons = diagnostics.verdict(d)
    acc, st, pt = d["mala_acceptance"], r.settings, d["plateau_test"]
    plateau = "ok" if pt.get("ok") else f"drift {pt.get('z', float('nan')):.2g} s.e."
    verdict = "converged" if ok else "not converged: " + "; ".join(reasons)
    return (f"| {path.rstrip('/').split('/')[-1]} | {r.nbeta:g} | {st['step_size']:.3g} | {st['localization']:.4g} | "
            f"{st['n_steps']} / {r.n_burnin} | {r.llc_mean:.4g} ± {d['llc_se']:.2g} | "
            f"{sum(acc) / len(acc):.3f} ({min(acc):.3f}) | {d['r_hat_rank']:.3f} | {d['ess_bulk']:.0f} | {plateau} | "
            f"{verdict} |")


if __name__ == "__main__":
    print("| selection | nβ | step | γ | steps / burn-in | λ̂ ± s.e. | MALA acc. mean (min) | R̂ | bulk ESS | plateau | "
          "verdict |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for path in sys.argv[1:]:
        print(row(path))
