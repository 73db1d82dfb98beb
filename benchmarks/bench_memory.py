"""Peak memory of the passes against `plan_memory` and against the number of batches (issue 13).

For each pass (``collect``: activation + KL-Jacobian statistics at every resid_pre and mlp_post site; ``sync``:
head and neuron synchronisation sums; ``llc``: ``estimate_llc`` on the last block) the script runs n and then
4n batches (SGLD steps for the LLC) in one process and reports, per call,

- the peak during the call: CUDA ``max_memory_allocated``; CPU the resident set's high-water mark (VmHWM,
  reset before the call through ``/proc/self/clear_refs``), minus the resident set before the call, plus the
  model's weights — i.e. what the run adds on top of the resident weights, like the GPU figure;
- what stays after the call (RSS / ``memory_allocated``): it must not grow with the batch count;
- the plan's estimate (``plan_memory(...).total_bytes()``: weights + accumulators + one batch's working set).

    python benchmarks/bench_memory.py --what collect --n-layer 12 --batches 50 --batch-size 1 --seq-len 32
    python benchmarks/bench_memory.py --what collect --n-layer 2 --batches 2 --batch-size 1 --seq-len 16  # quick
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

import torch
from common import device_name, gpt2_shaped_model, record

import tl_degeneracy as tld
from tl_degeneracy.collection.memory import plan_memory, weight_bytes
from tl_degeneracy.llc.behavioral import estimate_llc

HERE = Path(__file__).resolve().parent
GIB = 1024**3


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


class PeakMeter:
    """Peak bytes during a block: CUDA allocator peak, or the CPU resident high-water mark.

    On Linux the kernel's VmHWM is reset by writing 5 to /proc/self/clear_refs; where that is refused a thread
    samples VmRSS every 2 ms instead (which can miss a spike shorter than that).
    """

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    def __enter__(self) -> PeakMeter:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
            return self
        self.before = _status("VmRSS")
        self.sampled = self.before
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.thread = None
        except OSError:
            self.stop = False
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while not self.stop:
            self.sampled = max(self.sampled, _status("VmRSS"))
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated()
            self.after = torch.cuda.memory_allocated()
            return
        if self.thread is None:
            self.peak = _status("VmHWM")
        else:
            self.stop = True
            self.thread.join()
            self.peak = self.sampled
        self.after = _status("VmRSS")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--what", default="collect", choices=["collect", "sync", "llc"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--size", default="small", choices=["small", "medium", "large", "xl"])
    p.add_argument("--n-layer", type=int, default=None, help="override the depth (a quick CPU run)")
    p.add_argument("--batches", type=int, default=5, help="n: the script runs n, then 4n batches (or steps)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--seq-len", type=int, default=32)
    p.add_argument("--n-probes", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(HERE / "results.jsonl"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    model = gpt2_shaped_model(args.size, device=args.device, n_layer=args.n_layer)
    n_layers = model.cfg.n_layers
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"]) if args.what == "collect" else []
    layers = list(range(n_layers)) if args.what == "sync" else []
    plan = plan_memory(model, sites, batch_size=args.batch_size, seq_len=args.seq_len,
                       jacobian=args.what == "collect", head_sync_layers=layers, neuron_sync_layers=layers)
    weights = weight_bytes(model)
    print(f"device: {device_name(args.device)}; GPT-2-{args.size}-shaped, {n_layers} layers; pass: {args.what}; "
          f"batch {args.batch_size} x {args.seq_len}; {len(sites)} sites")
    print(plan.describe())
    vocab = model.cfg.d_vocab

    def run(n: int) -> None:
        if args.what == "llc":
            tokens = torch.randint(0, vocab, (2 * args.batch_size, args.seq_len),
                                   generator=torch.Generator().manual_seed(0))
            data = tld.token_batches(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size)
            estimate_llc(model, data, params=f"blocks.{n_layers - 1}", nbeta=1000.0, step_size=1e-5,
                         localization=100.0, n_steps=n, n_burnin=n // 2, n_chains=2, progress=False)
            return
        tokens = torch.randint(0, vocab, (n * args.batch_size, args.seq_len),
                               generator=torch.Generator().manual_seed(n))
        data = tld.token_batches(model, tokens, seq_len=args.seq_len, batch_size=args.batch_size)
        stats = tld.collect(model, data, sites=sites, jacobian="kl" if sites else None, n_probes=args.n_probes,
                            head_sync=bool(layers), neuron_sync=bool(layers), memory_budget=None, progress=False)
        assert stats.meta["batches_done"] == n
        del stats

    print("| pass | batches | seconds | peak during call GiB (incl. weights) | plan GiB | peak / plan | "
          "resident after call GiB |")
    print("|---|---|---|---|---|---|---|")
    for n in (args.batches, 4 * args.batches):
        with PeakMeter(args.device) as meter:
            t0 = time.perf_counter()
            run(n)
            dt = time.perf_counter() - t0
        peak = meter.peak - meter.before + weights
        plan_bytes = plan.total_bytes() if args.what != "llc" else float("nan")
        print(f"| {args.what} | {n} | {dt:.1f} | {peak / GIB:.3f} | {plan_bytes / GIB:.3f} | "
              f"{peak / plan_bytes:.2f} | {meter.after / GIB:.3f} |", flush=True)
        record(Path(args.out), dict(bench="memory", what=args.what, device=device_name(args.device),
                                    size=args.size, n_layers=n_layers, batches=n, batch_size=args.batch_size,
                                    seq_len=args.seq_len, seconds=dt, peak_bytes=peak, plan_bytes=plan_bytes,
                                    resident_after=meter.after, resident_before=meter.before,
                                    pid=os.getpid(), command=" ".join(sys.argv)))


if __name__ == "__main__":
    main()
