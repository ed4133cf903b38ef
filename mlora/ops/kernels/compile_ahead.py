"""Compile the Triton kernels a step launches side by side, before the step runs.

With Triton's disk cache empty (a fresh container, a new cluster node) a run's first
steps compile each kernel variant when it is first launched, one after another, while
the GPU waits: about 9 s of a 7B run's start on an H200 (bench/README.md, 2026-12-03).
Each first launch also builds the kernel's launcher: with Triton 3.6 a C module per
signature, compiled by the host's C compiler (11 of them, 0.25-0.4 s each, for a tiny
model's step on an H200). `compile_only` runs a block in which every Triton launch hands
its kernel to a thread pool (Triton's async compile mode) and launches nothing; leaving
the block waits for the compiles, then builds every compiled kernel's launcher on the
same threads, so both land in Triton's caches. The mode is a context variable, so it is
set again in autograd's backward thread (the backward's kernels compiled one by one
there without it). The compilers run as subprocesses (ptxas, the C compiler) and
release the GIL there; the Python and MLIR parts of a compile do not all run in
parallel. Running a step inside the block compiles exactly the variants the real step
then finds cached: same arguments, hence same specializations. Nothing a launch would
have written is written, so whatever the step computes in the block is garbage and must
be thrown away.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator


def available() -> bool:
    """Whether this Triton has the async compile mode and the launch entry point patched here."""
    try:
        from triton.runtime import _async_compile
        from triton.runtime.jit import JITFunction
    except ImportError:
        return False
    return (hasattr(_async_compile, "AsyncCompileMode")
            and {"grid", "warmup"} <= set(inspect.signature(JITFunction.run).parameters))


def default_workers() -> int:
    return max(1, min(16, os.cpu_count() or 1))


@contextlib.contextmanager
def compile_only(workers: int | None = None) -> Iterator[None]:
    """Inside: Triton launches, from any thread (autograd's included), compile on
    `workers` threads and run nothing; on leaving, every compile has finished (or
    raised) and the launchers are built. Meant for the trainer's own thread at a run's
    start: a Triton launch from another thread meanwhile would not run either."""
    from triton.runtime import _async_compile
    from triton.runtime.jit import JITFunction

    launch = JITFunction.run
    pool = ThreadPoolExecutor(workers or default_workers(), thread_name_prefix="triton-compile")
    mode = _async_compile.AsyncCompileMode(pool)

    def compile_instead(self, *args, grid, warmup, **kwargs):  # type: ignore[no-untyped-def]
        # The async mode is a context variable, set in the thread that entered the block;
        # autograd runs a CUDA backward on its own thread, where it must be set again.
        token = _async_compile.active_mode.set(mode) if _async_compile.active_mode.get() is None else None
        try:
            return launch(self, *args, grid=grid, warmup=True, **kwargs)
        finally:
            if token is not None:
                _async_compile.active_mode.reset(token)

    with pool:
        JITFunction.run = compile_instead
        try:
            with mode:
                yield
        finally:
            JITFunction.run = launch
        kernels = [future.kernel for future in mode.future_kernels.values() if future.kernel is not None]
        for done in [pool.submit(build_launcher, kernel) for kernel in kernels]:
            done.result()


def build_launcher(kernel: object) -> str | None:
    """Build a compiled kernel's launcher now, so that its first launch finds it in
    Triton's cache. Best effort: a launcher that cannot be built here is built (and its
    error raised) at that launch, as without this; returns why it failed, if it did."""
    from triton.runtime import driver

    src, metadata = getattr(kernel, "src", None), getattr(kernel, "metadata", None)
    if src is None or metadata is None:
        return f"{kernel!r}: no source or metadata to build a launcher from"
    try:
        driver.active.launcher_cls(src, metadata)
    except Exception as exc:  # noqa: BLE001 - see the docstring
        return f"{getattr(kernel, 'name', kernel)}: {type(exc).__name__}: {exc}"
    return None
