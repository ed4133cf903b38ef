"""The base GEMM with the LoRA expand folded in as extra reduction steps.

    out[tile] = a[rows]·Wᵀ (or a[rows]·W)  +  Σ_{segments j meeting the rows} s_j·u[rows ∈ j]·V_j

Forward: a = x, W is [N, K] (nn.Linear), u = h = drop(x)·Aᵀ, V_j = B_jᵀ (columns
[off_j, off_j + r_j) of B_cat [N, Σr]).
Backward: a = dy, W is [K, N] (dx = dy·W), u = g = dy·B (fp32), V_j = A_j (rows
[off_j, off_j + r_j) of A_cat [Σr, N]), and the LoRA part of a segment with a dropout
mask is multiplied by it (and 1/(1-p)).

Each [BLOCK_M, BLOCK_N] tile adds, besides its K loop over the frozen weight, the
products of the segments its rows meet (usually one, two where a segment boundary
crosses the tile) with the rows of other segments masked to zero: up to rank 32 the
first two as one [BLOCK_M, 2R]·[2R, BLOCK_N] product, others [BLOCK_M, R]·[R, BLOCK_N]
in turn. That is R/K extra reduction steps per segment, and the LoRA output never
goes through memory. Without dropout the products follow the K loop; with dropout they
come first, so the element-wise mask needs no second accumulator. On CUDA with aligned
shapes the main loop reads a and W, and a 16-bit tile is written, through TMA tensor
descriptors; otherwise (odd shapes, the interpreter when asked) through pointers. Slots
are laid out at multiples of 8 ranks (zeros past a slot's rank), so the forward reads
B_cat's columns 16 bytes at a time (`tile_expand.b_block`); a gather of them with
unknown alignment spilled at R = 128. With a 16-bit output through descriptors and a
rank block of at most 64, one program per SM walks the tiles
(`fused_gemm_persistent_kernel`); elsewhere a program per tile.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.tools.tensor_descriptor import TensorDescriptor

from mlora.ops.kernels.interpret import INTERPRET
from mlora.ops.kernels import tile_expand as te
from mlora.ops.kernels.plan import SegmentPlan

INTERPRET_META = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2)
MAX_SOURCES = 3  # (a, W) pairs one launch sums: q, k and v's input gradients


def _set_block_shapes(nargs: dict) -> None:
    """Descriptors carry their block shape: set it to the config being run."""
    bm, bn, bk = nargs["BLOCK_M"], nargs["BLOCK_N"], nargs["BLOCK_K"]
    for a_name, w_name in (("a_src", "w_src"), ("a1_src", "w1_src"), ("a2_src", "w2_src")):
        if isinstance(nargs[a_name], TensorDescriptor):
            nargs[a_name].block_shape = [bm, bk]
        if isinstance(nargs[w_name], TensorDescriptor):
            nargs[w_name].block_shape = [bk, bn] if nargs["W_KN"] else [bn, bk]
    if isinstance(nargs["out_src"], TensorDescriptor):
        nargs["out_src"].block_shape = [bm, bn]


# BM, BN, BK, stages, warps, GROUP_M. Row tiles in groups of 16 rather than 8: the tiles
# one wave runs then read about 4,200 rows of a and W between them instead of 5,200 (at
# 132 SMs; 16 is near the square root of 132·BN/BM), and on an H200 every GEMM of a 7B
# layer (T = 8192, 4 jobs) was 0.5-2 % faster (bench/README.md, 2026-12-03, seventh session).
SHAPES = [(128, 256, 64, 3, 8, 16), (128, 128, 64, 4, 8, 16), (256, 128, 64, 3, 8, 16)]
# Shared memory a block may take: Hopper allows 227 KiB; the pipeline buffers are
# stages × (BM·BK + BK·BN) elements, the rest (barriers, epilogue) is tens of bytes.
# Compiled for sm_90, the configs below ask for at most 196,632 bytes in fp32 and
# 147,480 in bf16 (tests/kernel_smem.py); fp32 at the bf16 stage counts asked for up
# to 294,960 and failed to launch. Other GPUs allow less (an A100 163 KiB): the budget
# is the device's opt-in limit less the same 7 KiB of headroom, at most SMEM_BYTES.
SMEM_BYTES = 220 * 1024
SMEM_HEADROOM = 7 * 1024
HOPPER_SMEM = 232_448  # bytes of shared memory a block may opt in to on H100 / H200 (227 KiB)


def autotuning() -> bool:
    """Off unless MLORA_TRITON_AUTOTUNE=1: the tuner picked the first shape at every
    benchmarked shape, and tuning cannot be cached on disk (the TMA pre-hook), so every
    run would pay it again (a few seconds at the start of a 1.1B run)."""
    return os.environ.get("MLORA_TRITON_AUTOTUNE", "0") == "1"


@functools.lru_cache(maxsize=8)
def smem_limit(device: torch.device) -> int:
    """Shared memory a block may opt in to on this device (Hopper's off CUDA)."""
    if device.type != "cuda":
        return HOPPER_SMEM
    return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0) or HOPPER_SMEM


@functools.lru_cache(maxsize=16)
def smem_budget(device: torch.device) -> int:
    """Pipeline-buffer bytes a block may take on this device (SMEM_BYTES off CUDA)."""
    return min(SMEM_BYTES, smem_limit(device) - SMEM_HEADROOM)


# fp32 without TF32 ("ieee"): Triton computes the dot with FMAs, every operand and
# accumulator element in registers, so the tensor-core tiles above spilled 23-50 KB of
# stack per thread (tests/kernel_smem.py) and took ~18 s each to compile. Tiles of
# 32 × 64 keep everything in registers at every rank up to 128.
IEEE_SHAPE = (32, 64, 32, 3, 4)


def fitted(element_size: int, budget: int = SMEM_BYTES,
           shapes: list[tuple[int, ...]] = SHAPES) -> list[tuple[dict, int, int]]:
    """`shapes` as (meta, stages, warps), each with as many pipeline stages as fit in
    `budget` bytes of shared memory for this element size (fp32 tiles are twice bf16's)."""
    out = []
    for bm, bn, bk, stages, warps, *group in shapes:  # GROUP_M, when given, sixth (else 8)
        per_stage = (bm * bk + bk * bn) * element_size
        out.append((dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=group[0] if group else 8),
                    max(1, min(stages, budget // per_stage)), warps))
    return out


# The LoRA part alone (`split_gemm`): no K loop, so one small stage and a light block.
EXPAND_SHAPE = (128, 256, 16, 1, 8)


def launch_configs(element_size: int, budget: int = SMEM_BYTES, precision: str = "tf32",
                   expand_only: bool = False) -> list[tuple[dict, int, int]]:
    """The configs a launch may take: `fitted` SHAPES, the one IEEE_SHAPE for true fp32,
    or EXPAND_SHAPE for a launch without a K loop."""
    if precision == "ieee":
        return fitted(element_size, budget, [IEEE_SHAPE])
    return fitted(element_size, budget, [EXPAND_SHAPE] if expand_only else SHAPES)


def fixed_config(element_size: int, budget: int = SMEM_BYTES, precision: str = "tf32",
                 expand_only: bool = False) -> tuple[dict, int, int]:
    """The config launched without tuning: the first one that fits. (meta, stages, warps)"""
    return launch_configs(element_size, budget, precision, expand_only)[0]


def _configs() -> list[triton.Config]:
    """A few H100 bf16 shapes for the autotuner; `_fit_stages` trims them per dtype."""
    return [
        triton.Config(meta, num_stages=st, num_warps=nw, pre_hook=_set_block_shapes)
        for meta, st, nw in fitted(2)
    ]


def _fit_stages(configs: list[triton.Config], named_args: dict, **kwargs: object) -> list[triton.Config]:
    """The autotuner's early prune: the configs fitted to the output's element size (and
    true fp32's own), so fp32 tunes over configs that can launch (the dtype is part of
    the tuning key)."""
    out = named_args["out_ptr"]
    precision = str(kwargs.get("PRECISION", named_args.get("PRECISION", "tf32")))
    return [triton.Config(meta, num_stages=stages, num_warps=warps, pre_hook=_set_block_shapes)
            for meta, stages, warps in launch_configs(out.element_size(), smem_budget(out.device), precision)]


@triton.jit
def fused_gemm_kernel(
    a_src, w_src, out_ptr, out_src, bias_ptr, u_ptr, v_cat, mask_ptr,
    tok_lo, tok_hi, seg_start, seg_end, seg_off, seg_rank, seg_scale, seg_keep, seg_mask_row,
    M, N, K, M_BUCKET, RT, U_STRIDE, a1_src, w1_src, K1, a2_src, w2_src, K2,
    R: tl.constexpr, W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, DROPOUT: tl.constexpr,
    USE_TMA: tl.constexpr, PRECISION: tl.constexpr, V_ALIGNED: tl.constexpr, TMA_STORE: tl.constexpr,
    SOURCES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    dtype = out_ptr.dtype.element_ty
    pid = tl.program_id(0)
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = _tile_coords(pid, grid_m, grid_n, GROUP_M)
    m0 = pid_m * BLOCK_M
    n0 = pid_n * BLOCK_N
    rows = m0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < N
    rows64 = rows.to(tl.int64)
    cols64 = cols.to(tl.int64)

    lo = tl.load(tok_lo + m0)  # the segments lo..hi-1 meet the tile's rows
    hi = tl.load(tok_hi + tl.minimum(m0 + BLOCK_M, M))
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if DROPOUT:
        # The masked expand goes first, into the empty accumulator, masked once at the
        # end (segments own disjoint rows; 1/(1-p) rides in u). After the main loop a
        # masked product needs a second accumulator, and beside the first one ptxas
        # spilled: that dx GEMM took 2.7 ms instead of 0.44 at 4096² on an H200.
        acc = te.masked_expand(acc, lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, mask_ptr, seg_start, seg_end,
                               seg_off, seg_rank, seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R, W_KN,
                               PRECISION, V_ALIGNED)
    acc = _k_loop(acc, a_src, w_src, K, m0, n0, rows64, row_ok, cols64, col_ok, N, W_KN, USE_TMA, PRECISION, BLOCK_K)
    if SOURCES > 1:  # further (a, W) pairs: the same output's sum continues over their K
        acc = _k_loop(acc, a1_src, w1_src, K1, m0, n0, rows64, row_ok, cols64, col_ok, N, W_KN, USE_TMA, PRECISION,
                      BLOCK_K)
    if SOURCES > 2:
        acc = _k_loop(acc, a2_src, w2_src, K2, m0, n0, rows64, row_ok, cols64, col_ok, N, W_KN, USE_TMA, PRECISION,
                      BLOCK_K)

    if not DROPOUT:
        acc = te.expand(acc, lo, hi, rows, rows64, cols64, col_ok, N, u_ptr, v_cat, seg_start, seg_end, seg_off,
                        seg_rank, seg_scale, seg_keep, seg_mask_row, RT, U_STRIDE, dtype, R, W_KN, False, PRECISION,
                        V_ALIGNED)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if TMA_STORE:  # staged in the main loop's (then free) shared memory, edges clipped
        out_src.store([m0, n0], acc.to(dtype))
    else:
        tl.store(out_ptr + rows64[:, None] * N + cols64[None, :], acc.to(dtype), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def fused_gemm_persistent_kernel(
    a_src, w_src, out_ptr, out_src, bias_ptr, u_ptr, v_cat, mask_ptr,
    tok_lo, tok_hi, seg_start, seg_end, seg_off, seg_rank, seg_scale, seg_keep, seg_mask_row,
    M, N, K, RT, U_STRIDE, a1_src, w1_src, K1, a2_src, w2_src, K2,
    R: tl.constexpr, W_KN: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, V_ALIGNED: tl.constexpr,
    SOURCES: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, NUM_SMS: tl.constexpr, MORE_SEGMENTS: tl.constexpr, DROPOUT: tl.constexpr,
):
    """fused_gemm_kernel's product at rank blocks up to 64, operands and output through
    descriptors: one program per SM walks the tiles, so no program starts per tile and a
    tile's TMA store need not have drained before the SM starts the next tile's K loop
    (a program per tile waits for it before it exits). The expand is the pair product up
    to R = 32, unconditional (zero where the tile meets no segment), then, where some
    tile meets more than two segments (MORE_SEGMENTS) or at R = 64, `segment_loop`;
    with dropout, `masked_expand` before the K loop. The output leaves in two [BLOCK_M,
    BLOCK_N / 2] halves (half the staging memory).

    The tile and K loops stay nested. Flattened into one software-pipelined loop
    (`tl.range(flatten=True)`) a plain GEMM ran at cuBLAS's speed, but with the expand in
    the loop the GEMMs took 13-39 % longer (expand's loads pipelined, 2026-12-04) and,
    with them hidden from the pipeliner by inline PTX, still ~30 % (2026-12-05):
    bench/README.md, "Flattened loops and gate and up as one pair, measured"."""
    dtype = out_ptr.dtype.element_ty
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    for tile in tl.range(tl.program_id(0), grid_m * grid_n, NUM_SMS):
        pid_m, pid_n = _tile_coords(tile, grid_m, grid_n, GROUP_M)
        m0 = pid_m * BLOCK_M
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        # the segments lo..hi-1 meet the tile's rows: read before the K loop, which hides the wait
        lo = tl.load(tok_lo + m0, mask=m0 < M, other=0)
        hi = tl.load(tok_hi + tl.minimum(m0 + BLOCK_M, M), mask=m0 < M, other=0)
        if DROPOUT:  # the masked expand first, as in fused_gemm_kernel (and for its reason)
            rows = m0 + tl.arange(0, BLOCK_M)
            cols = n0 + tl.arange(0, BLOCK_N)
            acc = te.masked_expand(acc, lo, hi, rows, rows.to(tl.int64), cols.to(tl.int64), cols < N, N, u_ptr, v_cat,
                                   mask_ptr, seg_start, seg_end, seg_off, seg_rank, seg_scale, seg_keep, seg_mask_row,
                                   RT, U_STRIDE, dtype, R, W_KN, PRECISION, V_ALIGNED)
        for ki in range(k_tiles):  # `_k_loop`'s descriptor branch, written out as it was measured
            k0 = ki * BLOCK_K
            a = a_src.load([m0, k0])
            if W_KN:
                w = w_src.load([k0, n0])
            else:
                w = w_src.load([n0, k0]).T
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        rows = m0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        if SOURCES > 1:  # further pairs (the shared-input dx): their K loops in turn, as the tiled kernel's
            acc = _k_loop(acc, a1_src, w1_src, K1, m0, n0, None, None, None, None, N, W_KN, True, PRECISION, BLOCK_K)
        if SOURCES > 2:
            acc = _k_loop(acc, a2_src, w2_src, K2, m0, n0, None, None, None, None, N, W_KN, True, PRECISION, BLOCK_K)
        if not DROPOUT:
            first = lo
            if R <= te.PAIRED_RANK:
                u2, v2 = te.pair_operands(lo, hi, rows, rows.to(tl.int64), cols.to(tl.int64), col_ok, N, u_ptr, v_cat,
                                          seg_start, seg_end, seg_off, seg_rank, seg_scale, seg_keep, seg_mask_row, RT,
                                          U_STRIDE, dtype, R, W_KN, False, V_ALIGNED)
                acc = tl.dot(u2, v2, acc, input_precision=PRECISION)
                first = lo + 2
            if MORE_SEGMENTS or R > te.PAIRED_RANK:
                acc = te.segment_loop(acc, first, hi, rows, rows.to(tl.int64), cols.to(tl.int64), col_ok, N, u_ptr,
                                      v_cat, seg_start, seg_end, seg_off, seg_rank, seg_scale, seg_keep, seg_mask_row,
                                      RT, U_STRIDE, dtype, R, W_KN, False, PRECISION, V_ALIGNED)
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        halves = tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N // 2)), (0, 2, 1))
        left, right = tl.split(halves)
        out_src.store([m0, n0], left.to(dtype))
        out_src.store([m0, n0 + BLOCK_N // 2], right.to(dtype))


@triton.jit
def _k_loop(acc, a_src, w_src, K, m0, n0, rows64, row_ok, cols64, col_ok, N, W_KN: tl.constexpr, USE_TMA: tl.constexpr,
            PRECISION: tl.constexpr, BLOCK_K: tl.constexpr):
    """acc + a[rows, :K]·W over K (W [K, N] if W_KN, else [N, K] read transposed)."""
    for k0 in range(0, K, BLOCK_K):
        if USE_TMA:
            a = a_src.load([m0, k0])
            if W_KN:
                w = w_src.load([k0, n0])
            else:
                w = w_src.load([n0, k0]).T
        else:
            kk = k0 + tl.arange(0, BLOCK_K)
            k_ok = kk < K
            a = tl.load(a_src + rows64[:, None] * K + kk[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if W_KN:
                w = tl.load(w_src + kk[:, None].to(tl.int64) * N + cols64[None, :],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            else:
                w = tl.load(w_src + cols64[None, :] * K + kk[:, None],
                            mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        acc = tl.dot(a, w, acc, input_precision=PRECISION)
    return acc


@triton.jit
def _tile_coords(tile, grid_m, grid_n, GROUP_M: tl.constexpr):
    """Grouped ordering: GROUP_M row tiles share each column of W while it is in L2."""
    in_group = GROUP_M * grid_n
    first_m = (tile // in_group) * GROUP_M
    group_rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (tile % in_group) % group_rows, (tile % in_group) // group_rows


PERSISTENT_MAX_RANK = 64  # the persistent GEMM's dx spilled 176 bytes a thread at R = 128 (the tiled one: none)


_tuned = None if INTERPRET else triton.autotune(
    configs=_configs(), key=["M_BUCKET", "N", "K", "W_KN", "DROPOUT", "SOURCES"], prune_configs_by={"early_config_prune": _fit_stages}
)(fused_gemm_kernel)


PERSISTENT_MODES = {"1": "on", "0": "off"}
SMEM_SLACK = 1024  # barriers and alignment beyond `persistent_smem`'s buffers (24 bytes on sm_90)


def persistent_mode() -> str:
    """Whether a GEMM the persistent launch (`fused_gemm_persistent_kernel`) applies to
    takes it, from MLORA_TRITON_PERSISTENT: "1" (the default) one program per SM, "0" a
    program per tile."""
    value = os.environ.get("MLORA_TRITON_PERSISTENT", "1")
    if value not in PERSISTENT_MODES:
        raise ValueError(f"MLORA_TRITON_PERSISTENT must be one of {', '.join(PERSISTENT_MODES)}, got {value!r}")
    return PERSISTENT_MODES[value]


def persistent_smem(meta: dict, stages: int, element_size: int) -> int:
    """Shared memory of the persistent GEMM's buffers, as compiled for sm_90
    (tests/kernel_smem.py checks it): the pipeline's stages and one [BLOCK_M, BLOCK_N / 2]
    half of the output staged for its store."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    return (stages * (bm * bk + bk * bn) + bm * bn // 2) * element_size


def persistent_launch(mode: str, tma_store: bool, rank_pad: int, meta: dict, stages: int, element_size: int,
                      smem_limit: int) -> str:
    """How a GEMM launches: "tiled" (a program per tile) or "persistent" (one program per SM,
    `fused_gemm_persistent_kernel`). The persistent kernel needs its output through a
    descriptor, a rank block of at most PERSISTENT_MAX_RANK and its staging buffer beside
    the pipeline's (so on a GPU with less shared memory than Hopper's it falls back
    rather than failing to launch)."""
    if mode == "off" or not tma_store or rank_pad > PERSISTENT_MAX_RANK:
        return "tiled"
    if persistent_smem(meta, stages, element_size) + SMEM_SLACK > smem_limit:
        return "tiled"
    return "persistent"


@functools.lru_cache(maxsize=8)
def _sm_count(device: torch.device) -> int:
    """Programs of a persistent launch: one per SM (3 when interpreting, so each walks tiles)."""
    if INTERPRET or device.type != "cuda":
        return 3
    return torch.cuda.get_device_properties(device).multi_processor_count


def _tma_ok(t: Tensor) -> bool:
    """TMA needs 16-byte aligned base and row stride, and a contiguous last dim."""
    size = t.element_size()
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and (t.shape[1] * size) % 16 == 0


def fused_gemm(
    a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    u: Tensor,
    v_cat: Tensor,
    masks: Tensor,
    plan: SegmentPlan,
    w_kn: bool,
    dropout: bool,
    precision: str,
    use_tma: bool | None = None,
    more: Sequence[tuple[Tensor, Tensor]] = (),
) -> Tensor:
    """a·Wᵀ (+bias) + expand (w_kn False), or a·W + masked expand (w_kn True): [M, N].

    v_cat is B_cat [N, Σr] (w_kn False) or A_cat [Σr, N] (w_kn True); u [M, R] may be a
    column slice of a wider tensor (its rows contiguous); masks the stacked int8
    keep-masks [rows, N] (read only when dropout). `more`: up to two further (a_i, W_i)
    pairs whose products join the sum in the same K loop (a_i [M, K_i]; W_i shaped as W
    for its K_i): the input gradient of several projections of one input, one output
    rounded once. use_tma None picks descriptors when the device and the shapes allow
    them (and MLORA_TRITON_TMA is not 0); a bf16 or fp16 output is then written through
    a descriptor too where its rows are aligned.
    """
    m, k = a.shape
    n = weight.shape[1] if w_kn else weight.shape[0]
    if u.stride(1) != 1 and u.shape[1] > 1:
        raise ValueError(f"fused_gemm: u's rows must be contiguous, got strides {u.stride()}")
    if len(more) > MAX_SOURCES - 1:
        raise ValueError(f"fused_gemm sums at most {MAX_SOURCES} products, got {1 + len(more)}")
    for a_i, w_i in more:
        k_i = a_i.shape[1]
        if (a_i.shape[0] != m or tuple(w_i.shape) != ((k_i, n) if w_kn else (n, k_i)) or a_i.dtype != a.dtype
                or w_i.dtype != weight.dtype or not (a_i.is_contiguous() and w_i.is_contiguous())):
            w_shape = f"[K_i, {n}]" if w_kn else f"[{n}, K_i]"
            raise ValueError(f"fused_gemm: a further product must be a contiguous [{m}, K_i] by {w_shape} in a's and "
                             f"W's dtypes, got {list(a_i.shape)} {a_i.dtype} by {list(w_i.shape)} {w_i.dtype}")
    out = torch.empty(m, n, dtype=a.dtype, device=a.device)
    if m == 0 or n == 0:
        return out
    if use_tma is None:
        use_tma = (os.environ.get("MLORA_TRITON_TMA", "1") != "0" and a.is_cuda
                   and torch.cuda.get_device_capability(a.device)[0] >= 9
                   and all(_tma_ok(t) for t in (a, weight, *(t for pair in more for t in pair))))
    meta, stages, warps = (INTERPRET_META, 1, 4) if INTERPRET else (None, 0, 0)
    if meta is None and (k == 0 or not autotuning()):
        meta, stages, warps = fixed_config(a.element_size(), smem_budget(a.device), precision, expand_only=k == 0)
    pairs = [(a, weight), *more]
    if use_tma:
        block = [16, 16]  # replaced by each config's pre-hook (or below when interpreting)
        srcs = [(TensorDescriptor.from_tensor(a_i, block), TensorDescriptor.from_tensor(w_i, block))
                for a_i, w_i in pairs]
        # fp32 tiles keep plain stores: with dropout their staging buffer no longer shared
        # the pipeline's memory and the block asked for 256 KiB (tests/kernel_smem.py)
        out_src = TensorDescriptor.from_tensor(out, block) if _tma_ok(out) and out.element_size() <= 2 else out
    else:
        srcs, out_src = pairs, out
    ks = [a_i.shape[1] for a_i, _ in pairs]
    while len(srcs) < MAX_SOURCES:  # unused sources: the first again, with no K
        srcs, ks = [*srcs, srcs[0]], [*ks, 0]
    bias_arg = bias if bias is not None else out
    tables = (plan.tok_lo, plan.tok_hi, plan.seg_start, plan.seg_end, plan.seg_off, plan.seg_rank, plan.seg_scale,
              plan.seg_keep, plan.seg_mask_row)
    further = (srcs[1][0], srcs[1][1], ks[1], srcs[2][0], srcs[2][1], ks[2])
    args = (
        srcs[0][0], srcs[0][1], out, out_src, bias_arg, u, v_cat, masks, *tables,
        m, n, k, triton.next_power_of_2(m), max(plan.rank_total, 1), u.stride(0), *further,
    )
    # V's rows start 16-byte aligned: A_cat's rows (dx), or B_cat's columns of every slot
    # (forward: slots start at multiples of 8 columns, `plan.padded_rank`)
    v_aligned = v_cat.data_ptr() % 16 == 0 and (not w_kn or (n * v_cat.element_size()) % 16 == 0)
    flags = dict(R=plan.rank_pad, W_KN=w_kn, HAS_BIAS=bias is not None, DROPOUT=dropout, USE_TMA=use_tma,
                 PRECISION=precision, V_ALIGNED=v_aligned, TMA_STORE=isinstance(out_src, TensorDescriptor),
                 SOURCES=len(pairs))
    if meta is not None:
        _set_block_shapes({"a_src": srcs[0][0], "w_src": srcs[0][1], "a1_src": srcs[1][0], "w1_src": srcs[1][1],
                           "a2_src": srcs[2][0], "w2_src": srcs[2][1], "out_src": out_src, "W_KN": w_kn, **meta})
        tiles = triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(n, meta["BLOCK_N"])
        launch = persistent_launch(persistent_mode(), flags["TMA_STORE"], plan.rank_pad, meta, stages,
                                   out.element_size(), smem_limit(a.device))
        if launch != "tiled":
            out_src.block_shape = [meta["BLOCK_M"], meta["BLOCK_N"] // 2]
            sms = _sm_count(a.device)
            most = plan.most_segments_per_tile(meta["BLOCK_M"], m)
            fused_gemm_persistent_kernel[(min(sms, tiles),)](
                srcs[0][0], srcs[0][1], out, out_src, bias_arg, u, v_cat, masks, *tables, m, n, k,
                max(plan.rank_total, 1), u.stride(0), *further, R=plan.rank_pad, W_KN=w_kn,
                HAS_BIAS=bias is not None, PRECISION=precision, V_ALIGNED=v_aligned, SOURCES=len(pairs), NUM_SMS=sms,
                MORE_SEGMENTS=most > 2, DROPOUT=dropout, **meta, num_warps=warps, num_stages=stages)
            return out
        grid = (tiles,)
        fused_gemm_kernel[grid](*args, **flags, **meta, num_warps=warps, num_stages=stages)
    else:
        def grid(cfg: dict) -> tuple[int]:
            return (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(n, cfg["BLOCK_N"]),)

        _tuned[grid](*args, **flags)
    return out


def split_gemm(
    a: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    u: Tensor,
    v_cat: Tensor,
    masks: Tensor,
    plan: SegmentPlan,
    w_kn: bool,
    dropout: bool,
    precision: str,
) -> Tensor:
    """fused_gemm's result in two launches: the kernel with an empty K loop writes the LoRA
    part alone (plus bias; masked when dropout), then cuBLAS adds the base product onto it
    in place (`addmm_`, beta = 1: the LoRA part is read in cuBLAS's epilogue)."""
    lora = fused_gemm(a[:, :0], weight[:0] if w_kn else weight[:, :0], bias, u, v_cat, masks, plan, w_kn, dropout,
                      precision, use_tma=False)
    return lora.addmm_(a, weight if w_kn else weight.t())
