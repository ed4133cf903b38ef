"""Triton's cache key, hashed on a thread before the first launch (mlora.ops.triton_warm)."""

from __future__ import annotations

import pytest
import torch

from mlora.ops.triton_warm import prefetch_cache_key

cache = pytest.importorskip("triton.runtime.cache")


def test_the_key_is_hashed_once_on_a_thread_for_cuda_only() -> None:
    cache.triton_key.cache_clear()
    assert prefetch_cache_key(torch.device("cpu")) is None  # no compiled kernels on the CPU
    assert cache.triton_key.cache_info().currsize == 0
    thread = prefetch_cache_key(torch.device("cuda"))  # needs no GPU: the hash reads Triton's files
    assert thread is not None and thread.daemon
    thread.join(timeout=60)
    assert not thread.is_alive()
    info = cache.triton_key.cache_info()
    assert info.currsize == 1 and info.misses == 1
    key = cache.triton_key()  # the first launch finds it: a hit, the same key
    assert cache.triton_key.cache_info().hits == info.hits + 1
    assert key.startswith(__import__("triton").__version__)
    assert prefetch_cache_key(torch.device("cuda")) is None  # already there: no second thread
