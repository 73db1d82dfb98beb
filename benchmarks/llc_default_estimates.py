"""The default ``llc`` stage's estimates on the bundled model, one process per group (issue 16).

Each estimate is ``estimate_llc`` with ``RunConfig()``'s exact settings and data, as the stage runs it: the whole
model at the base nβ and at the sweep's other nβ (step ε·nβ₀/nβ, localization γ·nβ/nβ₀), or every layer at the base
nβ. Deterministic, so the results are the stage's own; two processes (``all`` and ``layers``) halve the wall time.
Saved as ``LLCResult`` folders under ``--out``; ``llc_retable.py`` prints their table.

    OMP_NUM_THREADS=1 python benchmarks/llc_default_estimates.py all --out runs/llc-default
    OMP_NUM_THREADS=1 python benchmarks/llc_default_estimates.py layers --out runs/llc-default
"""

from __future__ import annotations

import argparse
import time

import torch

import tl_degeneracy as tld
from tl_degeneracy.run.pipeline import RunConfig


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("group", choices=["all", "layers"])
    p.add_argument("--out", default="runs/llc-default")
    p.add_argument("--n-steps", type=int, default=None, help="chain length (default RunConfig().llc_steps)")
    args = p.parse_args()
    torch.set_num_threads(1)
    c = RunConfig()
    n_steps = args.n_steps or c.llc_steps
    model = tld.load_model(str(tld.bundled_model_path()), device="cpu")
    data = tld.load_data(model, c.data, seq_len=c.seq_len, batch_size=c.llc_batch_size, n_tokens=c.llc_n_tokens)
    nbetas = sorted(set(c.llc_nbetas or (c.llc_nbeta / 3, c.llc_nbeta, c.llc_nbeta * 3)))
    n_layers = tld.ModelAdapter(model).n_layers
    jobs = ([("all", c.llc_nbeta)] + [("all", nb) for nb in nbetas if nb != c.llc_nbeta] if args.group == "all"
            else [(f"blocks.{layer}", c.llc_nbeta) for layer in range(n_layers)])
    for sel, nb in jobs:
        start = time.perf_counter()
        r = tld.estimate_llc(model, data, params=sel, nbeta=nb, step_size=c.llc_step_size * c.llc_nbeta / nb,
                             localization=c.llc_localization * nb / c.llc_nbeta, loss="kl", n_chains=c.llc_chains,
                             n_steps=n_steps, n_burnin=c.llc_burnin, seed=c.seed, on_divergence="drop",
                             progress=False)
        r.save(f"{args.out}/{sel}_{nb:g}_{n_steps}")
        print(f"{sel} nβ={nb:g} wall {time.perf_counter() - start:.0f} s | {r}", flush=True)


if __name__ == "__main__":
    main()
