"""Data-parallel ``collect`` (issue 18): global tokens/s with 1 and N processes under ``torchrun``.

The bundled model (``tld.bundled_model_path()``), activation statistics at resid_pre and mlp_post of every
layer plus the KL output-Jacobian (K = ``--n-probes``), ``--n-tokens`` tokens of the bundled held-out data.
Each process uses ``--threads`` torch threads. Rank 0 prints one JSON line: world size, backend, the pass's
wall seconds (the slowest rank's) and the global token rate; the model load and the process start are not
counted. Run it once per world size, e.g.

    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=1 benchmarks/bench_distributed.py
    OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 benchmarks/bench_distributed.py
    torchrun --standalone --nproc_per_node=8 benchmarks/bench_distributed.py --device cuda --n-tokens 2000000

(``python benchmarks/bench_distributed.py`` without torchrun is the single-process pass, no process group;
from a source checkout that is not the installed copy, prefix ``PYTHONPATH=$PWD``.)
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

import tl_degeneracy as tld
from tl_degeneracy.collection.distributed import context, init_from_env, local_device


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-tokens", type=int, default=8192)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-probes", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    ctx = init_from_env() if "WORLD_SIZE" in os.environ else None
    device = local_device(args.device)
    model = tld.load_model(str(tld.bundled_model_path()), device=device)
    data = tld.load_data(model, None, seq_len=args.seq_len, batch_size=args.batch_size, n_tokens=args.n_tokens)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    if ctx is not None:
        dist.barrier()
    t0 = time.perf_counter()
    stats = tld.collect(model, data, sites=sites, jacobian="kl", n_probes=args.n_probes, progress=False,
                        distributed=None if ctx else False)
    wall = time.perf_counter() - t0
    ctx = context()
    if ctx is None or ctx.is_main:
        print(json.dumps({"world_size": 1 if ctx is None else ctx.world_size,
                          "backend": None if ctx is None else ctx.backend, "device": device,
                          "threads_per_process": args.threads, "n_tokens": stats.n_tokens, "n_batches": len(data),
                          "pass_seconds": round(stats.meta["seconds"], 2), "wall_seconds": round(wall, 2),
                          "tokens_per_s": round(stats.n_tokens / wall, 1)}))
    if ctx is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
