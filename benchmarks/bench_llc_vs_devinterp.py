"""tl_degeneracy.estimate_llc against devinterp 2.0.1 on the same model, data, loss and sampler settings.

Both estimate the local learning coefficient of the KL behavioral loss of a tiny TransformerLens 4.x model
(the TransformerBridge.boot_native configuration of the LLC tests) with plain SGLD: the same nβ, step size,
localization, chains, burn-in and draws, the same batches in the same order, the same counted positions
(1..T−1 of every row; the BOS position is excluded) and the teacher log-probabilities cached per batch on
both sides. Runs alternate (devinterp, ours, devinterp, ours, ...) and the table gives the median wall time.

devinterp is not a project dependency: ``pip install devinterp==2.0.1`` (it keeps torch as it is).

Usage::

    python benchmarks/bench_llc_vs_devinterp.py [--repeats 3] [--threads 1] [--steps 300] [--burnin 100]

Notes on fairness:
- devinterp's reported ``llc_mean`` averages the burn-in steps too (ECOSYSTEM §3); the comparison uses
  λ̂ recomputed from its own loss trace without them, and prints the reported value beside it.
- devinterp runs chains on ``deepcopy``s of the model. On a 4.x TransformerBridge, the copy's capture hooks
  still point at the original's attention modules (their closures are shared by ``deepcopy``), so the first
  chain leaves a non-leaf tensor in the original and the second ``deepcopy`` fails. The model handed to
  devinterp is therefore wrapped in a module whose ``__deepcopy__`` first clears those stale captures; the
  weights, forward and sampler are untouched.
- devinterp samples in train mode; the loss function given to it switches the copy to eval first (the tiny
  model has no dropout, so this only keeps both sides identical).
- devinterp computes an initial loss over ``num_init_loss_batches`` batches per chain; for the KL loss it is 0
  and we ask for one batch. Its results are written to a temporary zarr store, as its API requires.
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import statistics
import tempfile
import time
import warnings

import torch
from transformer_lens.config import TransformerBridgeConfig
from transformer_lens.model_bridge import TransformerBridge

import tl_degeneracy as tld


def tiny_model() -> TransformerBridge:
    cfg = TransformerBridgeConfig(
        d_model=32,
        n_layers=2,
        n_ctx=16,
        d_head=8,
        n_heads=4,
        d_mlp=64,
        d_vocab=50,
        act_fn="gelu_new",
        normalization_type="LN",
        seed=0,
    )
    return TransformerBridge.boot_native(cfg).eval()


class _DeepcopyableBridge(torch.nn.Module):
    """The bridge, for devinterp: same parameters and forward; ``deepcopy`` clears stale attention captures."""

    def __init__(self, bridge: TransformerBridge):
        super().__init__()
        self.inner = bridge
        self.cfg = bridge.cfg

    def forward(self, input_ids, **kwargs):
        return self.inner(input_ids, **kwargs)

    def to(self, *args, print_details=None, **kwargs):  # devinterp passes print_details to TL models
        self.inner.to(*args, **kwargs)
        return self

    def __deepcopy__(self, memo):
        for module in self.inner.modules():
            if getattr(module, "_captured_pre_ln_residual", None) is not None:
                module._captured_pre_ln_residual = None
        return _DeepcopyableBridge(copy.deepcopy(self.inner, memo))


def run_devinterp(model, tokens, teacher, args, seed):
    from datasets import Dataset
    from devinterp.slt.llc import llc

    dataset = Dataset.from_dict({"input_ids": tokens.tolist()}).with_format("torch")
    cache = {row.numpy().tobytes(): lp for row, lp in zip(tokens, teacher, strict=True)}

    def kl_per_token(m, input_ids):  # (batch, T − 1): positions 1..T−1, as the counted positions of ours
        m.eval()
        logp = torch.stack([cache[r.cpu().numpy().tobytes()] for r in input_ids])
        logq = torch.log_softmax(m(input_ids).float(), dim=-1)
        return (logp.exp() * (logp - logq)).sum(-1)[:, 1:]

    with warnings.catch_warnings(), tempfile.TemporaryDirectory() as tmp:
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        res = llc(
            _DeepcopyableBridge(model),
            dataset,
            {},
            lr=args.step_size,
            n_beta=args.nbeta,
            localization=args.localization,
            num_chains=args.chains,
            num_draws=args.steps - args.burnin,
            num_burnin_steps=args.burnin,
            batch_size=args.batch_size,
            shuffle=False,
            num_init_loss_batches=1,
            init_seed=seed,
            loss_fn=kl_per_token,
            output_path=f"{tmp}/samples.zarr",
        )
        wall = time.perf_counter() - t0
        trace = torch.tensor(res.loss_trace.values, dtype=torch.float64)  # [chains, steps], burn-in first
        init = float(res.init_loss.values)
        reported = float(res.llc_mean.values)
    per_chain = args.nbeta * (trace[:, args.burnin :].mean(dim=1) - init)
    return wall, per_chain, reported


def run_ours(model, data, args, seed):
    t0 = time.perf_counter()
    res = tld.estimate_llc(
        model,
        data,
        nbeta=args.nbeta,
        step_size=args.step_size,
        localization=args.localization,
        n_chains=args.chains,
        n_steps=args.steps,
        n_burnin=args.burnin,
        seed=seed,
        progress=False,
        mala_every=args.mala_every,
    )
    return time.perf_counter() - t0, res.llc_per_chain, res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--chains", type=int, default=4)
    p.add_argument("--steps", type=int, default=300, help="total SGLD steps per chain, burn-in included")
    p.add_argument("--burnin", type=int, default=100)
    p.add_argument("--nbeta", type=float, default=1000.0)
    p.add_argument("--step-size", type=float, default=1e-4)
    p.add_argument("--localization", type=float, default=100.0)
    p.add_argument("--mala-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    model = tiny_model()
    tokens = torch.randint(
        0, model.cfg.d_vocab, (args.rows, model.cfg.n_ctx), generator=torch.Generator().manual_seed(1)
    )
    data = tld.token_batches(model, tokens, batch_size=args.batch_size)  # BOS position excluded
    with torch.no_grad():
        teacher = torch.log_softmax(model(tokens).float(), dim=-1)

    walls = {"devinterp": [], "ours": []}
    ours_chains, dev_chains, reported = [], [], []
    for r in range(args.repeats):  # a new seed per repeat: repeats x chains independent chains per side
        w, per_chain, rep = run_devinterp(model, tokens, teacher, args, args.seed + r)
        walls["devinterp"].append(w)
        dev_chains.append(per_chain)
        reported.append(rep)
        w, per_chain, res = run_ours(model, data, args, args.seed + r)
        walls["ours"].append(w)
        ours_chains.append(per_chain)

    d_all = torch.cat(dev_chains)
    o_all = torch.cat(ours_chains)
    d_mean, d_std = float(d_all.mean()), float(d_all.std())
    o_mean, o_std = float(o_all.mean()), float(o_all.std())
    se = math.sqrt(d_std**2 / d_all.numel() + o_std**2 / o_all.numel())
    t_dev, t_ours = statistics.median(walls["devinterp"]), statistics.median(walls["ours"])

    print(
        f"device: {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}"
    )
    print(
        f"setting: tiny TransformerBridge (2 layers, d_model 32, {res.diagnostics['n_sampled_entries']} parameters "
        f"sampled), {args.rows}×{model.cfg.n_ctx} "
        f"tokens in batches of {args.batch_size}, KL loss, SGLD nβ={args.nbeta:g} ε={args.step_size:g} "
        f"γ={args.localization:g}, {args.chains} chains × {args.steps} steps ({args.burnin} burn-in), "
        f"{args.repeats} repeats"
    )
    print(
        f"{'':12s} {'median wall s':>14s} {'all runs s':>24s} {'λ̂ (post-burn-in)':>20s} {'chain std':>10s}"
        f"  (λ̂ and std over all {args.repeats * args.chains} chains)"
    )
    print(
        f"{'devinterp':12s} {t_dev:14.2f} {str([round(x, 1) for x in walls['devinterp']]):>24s} "
        f"{d_mean:20.2f} {d_std:10.2f}"
    )
    print(
        f"{'tl_degeneracy':12s} {t_ours:14.2f} {str([round(x, 1) for x in walls['ours']]):>24s} "
        f"{o_mean:20.2f} {o_std:10.2f}"
    )
    print(
        f"speed-up {t_dev / t_ours:.2f}x; λ̂ difference {o_mean - d_mean:+.2f} = {(o_mean - d_mean) / se:+.2f} "
        f"standard errors; within the chain spread: {abs(o_mean - d_mean) <= max(o_std, d_std)}"
    )
    print(f"devinterp's reported llc_mean (burn-in averaged in): {statistics.mean(reported):.2f}")
    print(
        f"ours: vectorized chains {res.diagnostics['vectorized']}, MALA acceptance "
        f"{statistics.mean(res.diagnostics['mala_acceptance']):.2f}, R-hat {res.diagnostics['r_hat']:.3f}"
    )


if __name__ == "__main__":
    main()
