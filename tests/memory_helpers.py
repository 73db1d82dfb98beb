"""Leak checks for the streaming passes (issue 13): nothing of a batch may outlive it.

:func:`live_tensor_bytes` sums the storages of every tensor the garbage collector can see (after a full
collection, so only tensors that are really reachable — or stuck in a cycle the collector cannot break, such as
one through the C++ autograd graph — are counted). :func:`assert_no_growth` runs a pass over n and 4n batches
and asserts that what stays alive after the call does not grow with the batch count.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Callable
from typing import Any

import torch


def live_tensor_bytes() -> int:
    """Bytes of the distinct storages of all live tensors (CUDA: ``torch.cuda.memory_allocated`` is added)."""
    gc.collect()
    seen: dict[int, int] = {}
    with warnings.catch_warnings():  # isinstance on deprecated module aliases warns
        warnings.simplefilter("ignore")
        objects = [obj for obj in gc.get_objects() if isinstance(obj, torch.Tensor)]
    for obj in objects:
        try:
            if not obj.is_meta:
                st = obj.untyped_storage()
                seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
        except Exception:  # noqa: BLE001 - some tensor subclasses refuse storage access; skip them
            continue
    total = sum(seen.values())
    if torch.cuda.is_available():
        total += torch.cuda.memory_allocated()
    return total


def assert_no_growth(run: Callable[[int], Any], n: int, *, slack_bytes: int = 64 * 1024) -> tuple[int, int]:
    """Run ``run(n)`` then ``run(4 * n)`` (the argument is a batch or step count; results are dropped) and
    assert the live tensor bytes after each call agree within ``slack_bytes``.

    A first warm-up call ``run(n)`` absorbs one-time allocations (lazily built caches, the model's own
    buffers). A leak of one batch's state (activations, gradients, increments) costs at least a d² matrix per
    site and batch, far above the slack, and a 4n-batch run leaks 3n batches more than an n-batch one.
    Returns the two measurements.
    """
    run(n)
    base = live_tensor_bytes()
    run(n)
    after_n = live_tensor_bytes()
    run(4 * n)
    after_4n = live_tensor_bytes()
    assert after_n - base <= slack_bytes, f"live tensors grew by {after_n - base} B over one {n}-batch call"
    assert after_4n - after_n <= slack_bytes, (
        f"live tensors after a {4 * n}-batch call exceed those after a {n}-batch call by {after_4n - after_n} B: "
        "some per-batch state outlives its batch"
    )
    return after_n, after_4n
