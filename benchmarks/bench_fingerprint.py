"""Weight and data fingerprints (issue 15): how long ``ModelAdapter.weights_fingerprint`` takes on a
GPT-2-small-shaped model (HF ``GPT2Config()`` defaults, 124 M parameters, random weights, saved with
``save_pretrained`` to a temporary folder and loaded by ``tld.load_model``; nothing is downloaded), and how long
the run folder's content hash of that model folder (``pipeline.content_fingerprint``) takes.

    python benchmarks/bench_fingerprint.py --repeats 3

Prints one line per measurement: the fastest of ``--repeats`` runs, wall-clock seconds.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    from transformers import GPT2Config, GPT2LMHeadModel

    import tl_degeneracy as tld
    from tl_degeneracy._io import tensors_checksum
    from tl_degeneracy.run import pipeline

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        path = Path(tmp) / "gpt2-small-shaped"
        GPT2LMHeadModel(GPT2Config()).eval().save_pretrained(path)
        model = tld.load_model(str(path), device=args.device)
        adapter = tld.ModelAdapter(model)
        n_params = sum(p.numel() for p in model.parameters())
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fp = adapter.weights_fingerprint()
            times.append(time.perf_counter() - t0)
        print(f"weights_fingerprint: {n_params / 1e6:.1f} M parameters on {args.device}: {min(times):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)}) {fp[:19]}...")
        params = dict(model.named_parameters())
        for algorithm in ("sha256", "xxh3_128"):  # side by side, same bytes
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                tensors_checksum(params, algorithm=algorithm)
                times.append(time.perf_counter() - t0)
            print(f"tensors_checksum(algorithm={algorithm!r}) of the same weights: {min(times):.2f} s "
                  f"(runs: {', '.join(f'{t:.2f}' for t in times)})")
        times = []
        for _ in range(args.repeats):
            pipeline._hash_files.cache_clear()
            t0 = time.perf_counter()
            pipeline.content_fingerprint(str(path))
            times.append(time.perf_counter() - t0)
        size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
        print(f"content_fingerprint of the model folder ({size / 1e6:.0f} MB): {min(times):.2f} s "
              f"(runs: {', '.join(f'{t:.2f}' for t in times)})")


if __name__ == "__main__":
    main()
