"""Triton's once-per-process start-up work, moved off the first training step.

Before its first compiled launch (or disk-cache lookup) in a process, Triton hashes its
own package (the compiler's sources and the ~hundreds of MB of `libtriton`) into the key
of its kernel cache: about 0.4 s on an H200 host, paid inside the first step that runs a
Triton kernel (bench/README.md, "The start of a run"). The hash is cached for the
process, and sha256 releases the GIL on large buffers, so computing it on a thread while
the model loads takes it off the run's critical path.
"""

from __future__ import annotations

import threading

import torch


def prefetch_cache_key(device: torch.device) -> threading.Thread | None:
    """Start hashing Triton's cache key on a daemon thread when kernels will be compiled
    for `device` (CUDA, Triton installed); returns the thread, or None when nothing to do.

    A first launch that comes before the thread is done computes the key itself (the
    cache is a plain `lru_cache`): the same work as without the thread, nothing wrong.
    """
    if device.type != "cuda":
        return None
    try:
        from triton.runtime.cache import triton_key
    except ImportError:  # no Triton, or one that keeps the key elsewhere: nothing to warm
        return None
    if triton_key.cache_info().currsize:  # already computed in this process
        return None
    thread = threading.Thread(target=_quietly, args=(triton_key,), name="mlora-triton-key", daemon=True)
    thread.start()
    return thread


def _quietly(fn) -> None:  # type: ignore[no-untyped-def]
    """A failure here is the first launch's to report, where it surfaces today."""
    try:
        fn()
    except Exception:  # noqa: BLE001
        pass
