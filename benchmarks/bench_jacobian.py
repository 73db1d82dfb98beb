"""Output-Jacobian statistics (issue 3): throughput, and the probe estimator against the naive exact method.

Part A (``--part throughput``): tokens/s of ``collect`` with activation + KL-Jacobian statistics at every
resid_pre and mlp_post site (24 sites) of a GPT-2-small-shaped model (HF ``GPT2Config()`` defaults, random
weights, saved with ``save_pretrained`` to a temporary folder and loaded by ``tld.load_model``), K = 1 and 4
probes, with the probes started at the unembedding input (d_model space, the default) and at the logits.
Variants run interleaved, ``--repeats`` times; the fastest run of each is reported, in wall-clock seconds and in
process CPU seconds (all threads; on a machine shared with other jobs the CPU time is the steadier measure).

Part C (``--part cotangent``): the Jacobian component alone on one batch of the same model, probes started at
the unembedding input vs at the logits, CPU seconds (medians of ``--repeats`` alternating runs).

Part B (``--part naive``): on a small GPT-2, the naive method — one ``autograd.grad`` per output coordinate
(sequence-batched, as the rib library does), rows of J stored, then Σ_t J_tᵀ F J_t — against the K-probe
estimator at matched accuracy. Both estimate M of the data distribution from N tokens; the naive method's error
is the data's sampling error σ²_data/N, the probe's adds its own, σ²_probe/N (probes are independent of the
data). So the probe needs c = 1 + σ²_probe/σ²_data times the tokens to match, and

    speed ratio at matched accuracy = (naive seconds per token) / (c · probe seconds per token).

σ²_data is the spread of exact M between disjoint groups of rows, σ²_probe the spread of the probe estimate
around exact M on the same rows. It also times a few naive backward passes on the GPT-2-small-shaped model and
extrapolates the naive cost there (T · V passes per batch).

    python benchmarks/bench_jacobian.py                     # both parts, CPU-sized defaults
    python benchmarks/bench_jacobian.py --part naive --device cuda --rows 16 --seq-len 32
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

import torch
from common import device_name, record

import tl_degeneracy as tld
from tl_degeneracy.adapter import ModelAdapter, transformer_lens_version
from tl_degeneracy.collection.engine import accurate_matmuls, run_batch
from tl_degeneracy.collection.jacobian import JacobianMoments

HERE = Path(__file__).resolve().parent
#: every timed ``collect`` runs as one pass: no memory plan (a plan could split the sites over passes)
RUN = dict(progress=False, memory_budget=None)
EXACT = dict(estimator="exact", allow_expensive=True, **RUN)  # T·V backward passes per batch, on purpose


# ---- models -------------------------------------------------------------------------------------------------
def tiny_tokenizer(folder: Path):
    """A byte-level BPE tokenizer trained on a few lines, wrapped as GPT2TokenizerFast (the loader needs one saved;
    token ids are fed directly, so its vocabulary need not match the model's)."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import GPT2TokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(["for i in range(10):\n    print(i)\n"] * 4, vocab_size=300, min_frequency=1,
                            special_tokens=["<|endoftext|>"])
    bpe.save_model(str(folder))
    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:] if line]
    return GPT2TokenizerFast(vocab=vocab, merges=merges, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                             unk_token="<|endoftext|>")


def gpt2_model(device: str, **config):
    """``GPT2LMHeadModel(GPT2Config(**config))`` with random weights (seed 0) through ``tld.load_model``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    folder = Path(tempfile.mkdtemp(prefix="bench-jacobian-"))
    tok = tiny_tokenizer(folder)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(**config, bos_token_id=0, eos_token_id=0)).eval().save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return tld.load_model(folder / "model", device=device)


def random_data(model, rows: int, seq_len: int, seed: int, batch_size: int | None = None):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, ModelAdapter(model).d_vocab, (rows, seq_len), generator=gen)
    return tld.token_batches(model, tokens, batch_size=batch_size or rows)


@contextlib.contextmanager
def cotangents_at(space: str):
    """``"d_model"``: the library's default; ``"logits"``: the adapter reports no affine unembedding."""
    if space == "d_model":
        yield
    else:
        with mock.patch.object(ModelAdapter, "unembedding", lambda self: None):
            yield


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- part A: throughput on GPT-2 small ------------------------------------------------------------------------
def part_throughput(args) -> list[dict]:
    model = gpt2_model(args.device)  # GPT2Config() defaults: 12 layers, d_model 768, d_mlp 3072, V 50257
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    data = random_data(model, args.rows, args.seq_len, seed=0)
    variants = [("activations only", None, 0, "d_model")]
    for k in args.probes:
        variants += [(f"kl K={k}, cotangent at unembedding input", "kl", k, "d_model"),
                     (f"kl K={k}, cotangent at logits", "kl", k, "logits")]
    tld.collect(model, random_data(model, 1, 4, seed=1), sites=sites, jacobian="kl", **RUN)  # warm-up
    wall: dict[str, list[float]] = {name: [] for name, *_ in variants}
    cpu: dict[str, list[float]] = {name: [] for name, *_ in variants}
    for _ in range(args.repeats):
        for name, metric, k, space in variants:
            with cotangents_at(space):
                sync(args.device)
                t0, c0 = time.perf_counter(), time.process_time()
                st = tld.collect(model, data, sites=sites, jacobian=metric, n_probes=max(k, 1), seed=0,
                                 **RUN)
                sync(args.device)
                dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if metric is not None:
                assert st.meta["components"]["JacobianMoments"]["cotangent_space"].startswith(
                    "unembedding" if space == "d_model" else "logits")
            wall[name].append(dt)
            cpu[name].append(dc)
            print(f"  {name:45s} {dt:7.2f} s wall {dc:7.2f} s CPU  {data.n_counted / dt:6.2f} tok/s", flush=True)
    out = []
    for name, _, k, space in variants:
        out.append({"bench": "jacobian_throughput", "model": "GPT2LMHeadModel(GPT2Config()) random, tld.load_model",
                    "sites": "24 (resid_pre + mlp_post)", "variant": name, "n_probes": k, "cotangent_space": space,
                    "tokens": data.n_counted, "rows": args.rows, "seq_len": args.seq_len,
                    "seconds": min(wall[name]), "tokens_per_s": data.n_counted / min(wall[name]),
                    "cpu_seconds": min(cpu[name]), "tokens_per_cpu_s": data.n_counted / min(cpu[name]),
                    "wall_all": wall[name], "cpu_all": cpu[name]})
    return out


# ---- part C: where the probes start, in isolation -------------------------------------------------------------
class PeakMemory:
    """Peak memory above the level at entry: ``torch.cuda.max_memory_allocated`` on CUDA; on CPU the process's
    resident set, sampled every millisecond from /proc/self/statm (Linux), which catches tensors alive ≥ 1 ms."""

    def __init__(self, device: str):
        self.device, self.peak = device, 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base, self._stop = self._rss(), threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self.peak = max(self.peak, self._rss() - self.base)
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.startswith("cuda"):
            self.peak = torch.cuda.max_memory_allocated() - self.base
        else:
            self._stop.set()
            self._thread.join()


def part_cotangent(args) -> list[dict]:
    """CPU seconds and peak memory of one batch of the Jacobian component alone (no activation statistics), probes
    started at the unembedding input vs at the logits, K = 1 and 4, alternated ``--repeats`` times; medians."""
    model = gpt2_model(args.device)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    adapter = ModelAdapter(model)
    batch = next(iter(random_data(model, args.rows, args.seq_len, seed=0)))
    cpu: dict[tuple[int, str], list[float]] = {}
    mem: dict[tuple[int, str], list[int]] = {}
    with adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls():
        for rep in range(args.repeats + 1):  # the first round warms up and is dropped
            for k in args.probes:
                for space in ("d_model", "logits"):
                    comp = JacobianMoments(adapter, sites, metric="kl", n_probes=k)
                    if space == "logits":
                        comp.unembedding = None
                    sync(args.device)
                    c0 = time.process_time()
                    with PeakMemory(args.device) as peak:
                        run_batch(adapter, [comp], batch, seed=0)
                        sync(args.device)
                    if rep:
                        cpu.setdefault((k, space), []).append(time.process_time() - c0)
                        mem.setdefault((k, space), []).append(peak.peak)
    out = []
    for key, xs in sorted(cpu.items()):
        k, space = key
        med, med_mem = sorted(xs)[len(xs) // 2], sorted(mem[key])[len(xs) // 2]
        print(f"  K={k} cotangent at {space:8s}: median {med:6.2f} CPU s (min {min(xs):.2f}, max {max(xs):.2f}), "
              f"peak memory +{med_mem / 2**20:.0f} MiB, over {len(xs)} runs", flush=True)
        out.append({"bench": "jacobian_cotangent_space", "model": "GPT2LMHeadModel(GPT2Config()) random",
                    "sites": "24 (resid_pre + mlp_post), Jacobian component only", "n_probes": k,
                    "cotangent_space": space, "tokens": int(batch.mask.sum()), "rows": args.rows,
                    "seq_len": args.seq_len, "cpu_seconds_median": med, "cpu_all": xs,
                    "peak_memory_bytes_median": med_mem, "peak_memory_all": mem[key]})
    return out


# ---- part B: naive per-output-coordinate method vs probes ----------------------------------------------------
def forward_for_naive(model, sites: list[str], tokens: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Logits with a graph from the residual stream before the first site, and the site tensors the forward used
    (resid_pre and mlp_post are used as hooked, so ``autograd.grad`` w.r.t. them is ∂/∂(activation))."""
    acts: dict[str, torch.Tensor] = {}

    def keep(name):
        def hook(act, hook):
            acts[name] = act

        return hook

    first = min(int(s.split(".")[1]) for s in sites)
    cut = (f"blocks.{first}.hook_resid_pre", lambda act, hook: act.detach().requires_grad_(True))
    with model.hooks(fwd_hooks=[cut] + [(s, keep(s)) for s in sites]):
        logits = model(tokens)
    return logits, [acts[s] for s in sites]


def naive_jacobian_gram(model, data, sites: list[str]) -> tuple[dict[str, torch.Tensor], int]:
    """M by the naive method: one ``autograd.grad`` per output coordinate (s, v), batched over sequences.

    Rows J[s, v] at every site are stored for one output position at a time, then
    Σ_t J_{s,t}ᵀ F_s J_{s,t} with F_s = diag(p_s) − p_s p_sᵀ is accumulated. Returns ({site: M}, passes).
    """
    adapter = ModelAdapter(model)
    totals = {s: 0.0 for s in sites}
    n_total, passes = 0, 0
    with adapter.eval_mode(), adapter.frozen_parameters(), accurate_matmuls(), torch.enable_grad():
        for batch in data:
            logits, inputs = forward_for_naive(model, sites, batch.tokens.to(adapter.device))
            mask = batch.mask.to(adapter.device)
            p = logits.detach().float().softmax(-1)  # [B, T, V]
            for s in range(mask.shape[1]):
                rows_b = mask[:, s]
                if not rows_b.any():
                    continue
                J = {site: [] for site in sites}  # each: V × [B, T, d]
                for v in range(p.shape[-1]):
                    grads = torch.autograd.grad(logits[rows_b, s, v].sum(), inputs, retain_graph=True)
                    passes += 1
                    for site, g in zip(sites, grads, strict=True):
                        J[site].append(g)
                for site in sites:
                    Js = torch.stack(J[site])[:, rows_b][:, mask[rows_b]]  # [V, tokens t of those rows, d]
                    ps = p[rows_b, s].repeat_interleave(mask[rows_b].sum(1), dim=0)  # p_s of each t's sequence
                    pJ = torch.einsum("tv,vtd->td", ps, Js)
                    totals[site] = totals[site] + torch.einsum("vtd,tv,vte->de", Js, ps, Js).double() \
                        - torch.einsum("td,te->de", pJ, pJ).double()
            n_total += int(mask.sum())
    return {s: totals[s] / n_total for s in sites}, passes


def part_naive(args) -> list[dict]:
    model = gpt2_model(args.device, n_embd=64, n_layer=2, n_head=4, n_inner=256, n_positions=64,
                       vocab_size=args.small_vocab)
    sites = tld.resolve_sites(model, ["resid_pre", "mlp_post"])
    groups = [random_data(model, args.rows, args.seq_len, seed=100 + g) for g in range(args.groups)]
    tld.collect(model, random_data(model, 1, 4, seed=1), sites=sites, jacobian="kl", **RUN)  # warm-up

    # correctness of the naive implementation against the library's exact estimator, and their timings
    sync(args.device)
    t0 = time.perf_counter()
    naive, passes = naive_jacobian_gram(model, groups[0], sites)
    sync(args.device)
    t_naive = time.perf_counter() - t0
    t0 = time.perf_counter()
    exact0 = tld.collect(model, groups[0], sites=sites, jacobian="kl", **EXACT)
    sync(args.device)
    t_exact = time.perf_counter() - t0
    agree = max(float((naive[s] - exact0.jacobian_gram(s)).norm() / exact0.jacobian_gram(s).norm()) for s in sites)
    print(f"  naive vs library exact: max relative difference {agree:.2e} ({passes} backward passes)")

    exact = [exact0] + [tld.collect(model, g, sites=sites, jacobian="kl", **EXACT)
                        for g in groups[1:]]
    n_tok = groups[0].n_counted
    out = [{"bench": "jacobian_naive", "method": "naive per output coordinate", "seconds": t_naive,
            "tokens": n_tok, "tokens_per_s": n_tok / t_naive, "backward_passes": passes,
            "max_rel_diff_vs_exact": agree},
           {"bench": "jacobian_naive", "method": "library exact (columns of F^1/2)", "seconds": t_exact,
            "tokens": n_tok, "tokens_per_s": n_tok / t_exact}]
    def probe_runs(k: int, data, ex, seeds) -> tuple[float, dict[str, list[float]]]:
        """Fastest time of ``collect`` with K probes, and each site's relative error² against exact M per seed."""
        best, err2 = float("inf"), {s: [] for s in sites}
        for seed in seeds:
            sync(args.device)
            t0 = time.perf_counter()
            st = tld.collect(model, data, sites=sites, jacobian="kl", n_probes=k, seed=seed, **RUN)
            sync(args.device)
            best = min(best, time.perf_counter() - t0)
            for s in sites:
                err2[s].append(float((st.jacobian_gram(s) - ex.jacobian_gram(s)).norm() ** 2
                                     / ex.jacobian_gram(s).norm() ** 2))
        return best, err2

    def mean(xs):
        return sum(xs) / len(xs)

    # (i) the same tokens, a target relative error ε of M (worst site): E ε² = ε₁² / K, so K_ε = ⌈ε₁² / ε²⌉;
    # run K_ε probes side by side and report the error they reach
    t1, err1 = probe_runs(1, groups[0], exact0, range(4 * args.seeds))
    eps1_sq = max(mean(v) for v in err1.values())
    for target in args.targets:
        k = max(1, -int(-eps1_sq // target**2))
        t_k, err_k = probe_runs(k, groups[0], exact0, range(args.seeds))
        reached = max(mean(v) for v in err_k.values()) ** 0.5
        print(f"  same tokens, target {target:.0%}: K = {k} probes, reached {reached:.1%}, "
              f"{t_k:.2f} s vs naive {t_naive:.2f} s: {t_naive / t_k:.1f}× faster", flush=True)
        out.append({"bench": "jacobian_naive", "method": f"probe K={k} (target {target:.0%} on the same tokens)",
                    "framing": "same tokens", "target_rel_error": target, "n_probes": k,
                    "reached_rel_error": reached, "seconds": t_k, "tokens": n_tok, "tokens_per_s": n_tok / t_k,
                    "speed_ratio_naive_over_probe": t_naive / t_k})

    # (ii) M of the data distribution: the probe needs c = 1 + σ²_probe / σ²_data times the naive method's tokens
    for k in args.probes:
        t_k, probe_sq, data_sq = float("inf"), {s: [] for s in sites}, {}
        for g, (data, ex) in enumerate(zip(groups, exact, strict=True)):
            t_g, e2 = probe_runs(k, data, ex, range(1000 * g, 1000 * g + args.seeds))
            t_k = min(t_k, t_g)
            for s in sites:
                probe_sq[s] += [x * float(ex.jacobian_gram(s).norm() ** 2) for x in e2[s]]
        for s in sites:
            Ms = torch.stack([ex.jacobian_gram(s) for ex in exact])
            data_sq[s] = float(((Ms - Ms.mean(0)) ** 2).sum() / (len(exact) - 1))  # E‖M_g − M‖² per group
        cs = {s: 1 + mean(probe_sq[s]) / data_sq[s] for s in sites}
        c = max(cs.values())  # the worst site sets the tokens the probe needs for every site to match
        ratio = (t_naive / n_tok) / (c * t_k / n_tok)
        print(f"  data distribution, K={k}: {n_tok / t_k:8.1f} tok/s, c = {c:.1f} "
              f"(median site {sorted(cs.values())[len(cs) // 2]:.1f}): {ratio:.1f}× faster than naive", flush=True)
        out.append({"bench": "jacobian_naive", "method": f"probe K={k} (data-distribution M)",
                    "framing": "data distribution", "n_probes": k, "seconds": t_k, "tokens": n_tok,
                    "tokens_per_s": n_tok / t_k, "c_worst_site": c, "c_per_site": cs,
                    "speed_ratio_naive_over_probe": ratio})
    for e in out:
        e.update({"model": f"GPT2LMHeadModel d_model 64, 2 layers, V {args.small_vocab}, random",
                  "sites": "4 (resid_pre + mlp_post)", "rows": args.rows, "seq_len": args.seq_len,
                  "groups": args.groups, "seeds_per_group": args.seeds})

    # the naive method on GPT-2 small, extrapolated from a few timed passes
    big = gpt2_model(args.device)
    big_sites = tld.resolve_sites(big, ["resid_pre", "mlp_post"])
    data = random_data(big, args.big_rows, args.big_seq_len, seed=0)
    batch = next(iter(data))
    adapter = ModelAdapter(big)
    with adapter.eval_mode(), adapter.frozen_parameters(), torch.enable_grad():
        logits, inputs = forward_for_naive(big, big_sites, batch.tokens.to(adapter.device))
        sync(args.device)
        t0 = time.perf_counter()
        for v in range(args.big_passes):
            torch.autograd.grad(logits[:, -1, v].sum(), inputs, retain_graph=True)
        sync(args.device)
        per_pass = (time.perf_counter() - t0) / args.big_passes
    n_pos = int(batch.mask.any(0).sum())
    V = adapter.d_vocab
    projected = per_pass * n_pos * V
    print(f"  GPT-2 small naive: {per_pass * 1e3:.1f} ms per pass × {n_pos} positions × {V} = {projected / 3600:.1f} h "
          f"for {data.n_counted} tokens ({data.n_counted / projected:.2e} tok/s, extrapolated)")
    out.append({"bench": "jacobian_naive", "method": "naive per output coordinate, GPT-2 small (extrapolated)",
                "model": "GPT2LMHeadModel(GPT2Config()) random", "seconds_per_pass": per_pass,
                "passes_per_batch": n_pos * V, "tokens": data.n_counted, "rows": args.big_rows,
                "seq_len": args.big_seq_len, "projected_seconds": projected,
                "tokens_per_s": data.n_counted / projected, "timed_passes": args.big_passes})
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["throughput", "cotangent", "naive", "all"], default="all")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--probes", default="1,4", help="comma-separated K values")
    p.add_argument("--rows", type=int, default=None, help="rows per batch (throughput: 2; naive: 8)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per row (throughput: 64; naive: 16)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--small-vocab", type=int, default=512)
    p.add_argument("--groups", type=int, default=6, help="disjoint row groups for σ²_data")
    p.add_argument("--seeds", type=int, default=4, help="probe seeds per group for σ²_probe")
    p.add_argument("--targets", default="0.1,0.05", help="relative errors of M to match on the same tokens")
    p.add_argument("--big-rows", type=int, default=2)
    p.add_argument("--big-seq-len", type=int, default=64)
    p.add_argument("--big-passes", type=int, default=8)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--out", default=str(HERE / "results.jsonl"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.probes = [int(k) for k in args.probes.split(",")]
    args.targets = [float(x) for x in args.targets.split(",")]
    env = {"device": device_name(args.device), "torch": torch.__version__,
           "transformer_lens": transformer_lens_version(), "command": " ".join(sys.argv),
           "load_average_start": os.getloadavg()[0]}
    print(f"device: {env['device']}")
    entries = []
    if args.part in ("throughput", "all"):
        print("== part A: GPT-2 small, 24 sites")
        a = argparse.Namespace(**{**vars(args), "rows": args.rows or 2, "seq_len": args.seq_len or 64})
        entries += part_throughput(a)
    if args.part in ("cotangent", "all"):
        print("== part C: probes started at the unembedding input vs at the logits")
        c = argparse.Namespace(**{**vars(args), "rows": args.rows or 1, "seq_len": args.seq_len or 64})
        entries += part_cotangent(c)
    if args.part in ("naive", "all"):
        print("== part B: naive per-output-coordinate method vs probes")
        b = argparse.Namespace(**{**vars(args), "rows": args.rows or 8, "seq_len": args.seq_len or 16})
        entries += part_naive(b)
    env["load_average_end"] = os.getloadavg()[0]
    for e in entries:
        record(Path(args.out), {**env, **e})


if __name__ == "__main__":
    main()
