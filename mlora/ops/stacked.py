"""Tensors that are parts of one buffer: weights stacked by rows, gradients side by side.

The shared-input call can run its members' GEMMs as one (a, W) pair (one K loop, which
a flattened persistent GEMM needs) when their frozen weights are consecutive row blocks
of one buffer and their outputs' gradients consecutive column blocks of another. These
find such layouts without copying anything; any other layout gives None, and the
caller takes its per-member path.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor


def _one_storage(tensors: Sequence[Tensor]) -> bool:
    first = tensors[0]
    return all(t.dtype == first.dtype and t.device == first.device
               and t.untyped_storage().data_ptr() == first.untyped_storage().data_ptr() for t in tensors)


def stacked_rows(tensors: Sequence[Tensor]) -> Tensor | None:
    """The [Σ rows, cols] tensor that contiguous 2-D `tensors` are consecutive row blocks
    of (the first's rows, then the next's), or None."""
    if len(tensors) < 2 or not _one_storage(tensors):
        return None
    first, at = tensors[0], tensors[0].data_ptr()
    for t in tensors:
        if t.dim() != 2 or not t.is_contiguous() or t.shape[1] != first.shape[1] or t.data_ptr() != at:
            return None
        at += t.numel() * t.element_size()
    return first.as_strided((sum(t.shape[0] for t in tensors), first.shape[1]), (first.shape[1], 1))


def side_by_side(tensors: Sequence[Tensor]) -> Tensor | None:
    """The [rows, Σ widths] tensor that [..., width_m] `tensors` are consecutive column
    blocks of (each row: the first's columns, then the next's), or None."""
    if len(tensors) < 2 or not _one_storage(tensors) or any(t.shape[-1] == 0 for t in tensors):
        return None
    try:
        flat = [t.view(-1, t.shape[-1]) for t in tensors]
    except RuntimeError:  # leading dims that do not flatten into one row stride
        return None
    total = sum(t.shape[1] for t in flat)
    first, at = flat[0], flat[0].data_ptr()
    for t in flat:
        if t.shape[0] != first.shape[0] or t.stride() != (total, 1) or t.data_ptr() != at:
            return None
        at += t.shape[1] * t.element_size()
    return first.as_strided((first.shape[0], total), (total, 1))
