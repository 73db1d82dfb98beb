"""Neuron-synchronisation and LLC-step costs against their floors (issue 21), side by side in one run.

On a GPT-2-small-shaped model (random weights, full 50,257 vocabulary, ``--n-layer`` blocks), with
interleaved repeats (every repeat times every row once, in the same order), the median of:

- ``forward``: one forward of the data (no graph), the floor of a pass without a backward;
- ``collect base``: ``collect`` with one site (``resid_pre`` of the last block), no Jacobian;
- ``collect + neuron sync``: the same with ``neuron_sync=True`` on every layer; the difference to
  ``collect base`` is the neuron-synchronisation cost, printed beside its FLOPs (two or three
  d_mlp × d_mlp products per token and layer, ECOSYSTEM §5) and the achieved GFLOP/s;
- ``forward+backward (weights)``: forward, a scalar loss and a backward into every weight (the floor of an
  SGLD step);
- ``LLC step``: ``estimate_llc`` (KL, all weights, ``--llc-chains`` chains, no MALA checks) per step, from the
  difference of a run of ``2 s`` and one of ``s`` steps (so the per-call setup, the teacher cache and the
  first-step allocations cancel), against chains × the forward+backward floor;
- ``MALA check``: the same ``2 s`` steps with a MALA check after every step (``mala_every=1``); the difference
  per step is the cost of one check (one more gradient evaluation at the proposal). A default estimate checks
  50 of its post-burn-in steps (``mala_every="auto"``), so this is counted separately from the step.

``--llc-model bundled`` measures the LLC rows on the bundled model at the default run's batches (4 × 128 tokens)
instead of the GPT-2-small shape: the setting of the issue's "182 ms per step against a 133 ms floor".

    python benchmarks/bench_floors.py --n-layer 2 --rows 8 --seq-len 128 --llc-rows 2 --repeats 3 --threads 1
    python benchmarks/bench_floors.py --llc-model bundled --llc-rows 4 --llc-chains 4 --llc-steps 10 --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from common import device_name, gpt2_shaped_model, record

import tl_degeneracy as tld
from tl_degeneracy.adapter import ModelShape, as_adapter
from tl_degeneracy.llc.behavioral import estimate_llc

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n-layer", type=int, default=2)
    p.add_argument("--rows", type=int, default=8, help="sequences for the collect rows (one batch)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--llc-rows", type=int, default=2, help="sequences per LLC batch")
    p.add_argument("--llc-steps", type=int, default=2, help="s: the LLC rows run s and 2s steps")
    p.add_argument("--llc-chains", type=int, default=1)
    p.add_argument("--llc-model", choices=["gpt2-shape", "bundled"], default="gpt2-shape",
                   help="the model of the LLC rows (the sync rows always use the GPT-2-small shape)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(HERE / "results.jsonl"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = gpt2_shaped_model("small", device=args.device, n_layer=args.n_layer)
    shape = ModelShape.of(model)
    adapter = as_adapter(model)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, shape.d_vocab, (args.rows, args.seq_len), generator=gen)
    data = tld.token_batches(model, tokens, seq_len=args.seq_len, batch_size=args.rows)
    llc_model = model if args.llc_model == "gpt2-shape" else tld.load_model(str(tld.bundled_model_path()),
                                                                            device=args.device)
    llc_adapter = as_adapter(llc_model)
    llc_tokens = torch.randint(0, llc_adapter.d_vocab, (args.llc_rows, args.seq_len), generator=gen)
    llc_data = tld.token_batches(llc_model, llc_tokens, seq_len=args.seq_len, batch_size=args.llc_rows)
    site = f"blocks.{shape.n_layers - 1}.hook_resid_pre"
    sync_kw = dict(sites=[site], memory_budget=None, progress=False)
    llc_kw = dict(nbeta=1000.0, step_size=1e-6, localization=100.0, n_chains=args.llc_chains, progress=False)
    dev = torch.device(args.device)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def forward() -> None:
        with torch.no_grad(), adapter.eval_mode():
            adapter.forward(tokens.to(dev))

    def forward_backward_weights() -> None:
        llc_model.zero_grad(set_to_none=True)
        with llc_adapter.eval_mode():
            logits = llc_adapter.forward(llc_tokens.to(dev))
            logits.float().logsumexp(-1).mean().backward()
        llc_model.zero_grad(set_to_none=True)

    def llc(steps: int, mala_every: int = 0) -> None:
        estimate_llc(llc_model, llc_data, n_steps=steps, n_burnin=0, mala_every=mala_every, **llc_kw)

    rows = {
        "forward": forward,
        "collect base": lambda: tld.collect(model, data, **sync_kw),
        "collect + neuron sync": lambda: tld.collect(model, data, neuron_sync=True, **sync_kw),
        "forward+backward (weights)": forward_backward_weights,
        "LLC s steps": lambda: llc(args.llc_steps),
        "LLC 2s steps": lambda: llc(2 * args.llc_steps),
        "LLC 2s steps, MALA check every step": lambda: llc(2 * args.llc_steps, mala_every=1),
    }
    for fn in rows.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {k: [] for k in rows}
    for _ in range(args.repeats):
        for name, fn in rows.items():
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    n_tok = data.n_counted
    sync_s = med["collect + neuron sync"] - med["collect base"]
    n_products = 2 if shape.act_fn == "relu" else 3
    sync_flops = n_products * 2 * (shape.d_mlp or 0) ** 2 * n_tok * shape.n_layers
    step_s = (med["LLC 2s steps"] - med["LLC s steps"]) / args.llc_steps
    mala_s = (med["LLC 2s steps, MALA check every step"] - med["LLC 2s steps"]) / (2 * args.llc_steps)
    fb = med["forward+backward (weights)"] * args.llc_chains
    print(f"device: {device_name(args.device)}; GPT-2-small-shaped, {shape.n_layers} layers; collect rows "
          f"{args.rows} x {args.seq_len} ({n_tok} counted tokens); LLC batches {args.llc_rows} x {args.seq_len}; "
          f"{args.repeats} interleaved repeats (median)")
    print("| row | seconds (median; all) |")
    print("|---|---|")
    for k, v in times.items():
        print(f"| {k} | {med[k]:.3f}; {', '.join(f'{t:.3f}' for t in v)} |")
    print(f"\nneuron sync: {sync_s:.3f} s for {shape.n_layers} layers = {sync_s / med['forward']:.2f} x the forward "
          f"of the same tokens; {sync_flops / 1e9:.1f} GFLOP in {n_products} d_mlp^2 products per token and layer, "
          f"{sync_flops / max(sync_s, 1e-9) / 1e9:.1f} GFLOP/s achieved")
    print(f"LLC ({args.llc_model}, {args.llc_chains} chain(s), batches {args.llc_rows} x {args.seq_len}): "
          f"{step_s:.3f} s per step = {step_s / fb:.2f} x its floor (chains x forward + backward into the weights, "
          f"{fb:.3f} s); one MALA check {mala_s:.3f} s = {mala_s / fb:.2f} x the floor")
    record(Path(args.out), dict(bench="floors", device=device_name(args.device), n_layers=shape.n_layers,
                                tokens=n_tok, times=times, neuron_sync_s=sync_s,
                                neuron_sync_over_forward=sync_s / med["forward"], llc_step_s=step_s,
                                llc_step_over_floor=step_s / fb, llc_mala_check_s=mala_s, llc_model=args.llc_model,
                                llc_chains=args.llc_chains, command=" ".join(sys.argv)))


if __name__ == "__main__":
    main()
