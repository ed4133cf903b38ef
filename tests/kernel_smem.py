"""Shared memory and spill stack the compiled multi-LoRA kernels take on Hopper (sm_90),
with no GPU.

`triton.compile` targets sm_90 on any machine (the wheel bundles ptxas), and the
compiled kernel's metadata says how much shared memory a block needs. A kernel config
above the device's limit fails at launch with OutOfResources, which on an H200 is how a
fixed fp32 GEMM config was found to overflow (262,160 bytes, the figure this prints).
The cubin's stack frame (the bundled cuobjdump) is where ptxas spills registers: the
dx GEMM with dropout once spilled 0.9-3.6 KB there and ran 6x slower on an H200.
Run in a process without TRITON_INTERPRET (the interpreter replaces @triton.jit):

    python tests/kernel_smem.py      # JSON: one record per kernel, dtype and config
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import tempfile

assert os.environ.get("TRITON_INTERPRET", "0") in ("", "0"), "needs compiled kernels: unset TRITON_INTERPRET"

import triton  # noqa: E402
import triton.backends.nvidia  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from mlora.ops.kernels import fused_gemm, seg_grads, shrink  # noqa: E402

HOPPER_SMEM = 232_448  # bytes a block may use on H100 / H200 (227 KiB)
TARGET = GPUTarget("cuda", 90, 32)


# a global load of one 2-byte element (B's columns read so once spilled the forward GEMM)
NARROW_LOAD = re.compile(r"\bld\.global(?:\.[a-z]+)*\.[bsu]16\b")
CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")


def _stack(cubin: bytes) -> int:
    """Bytes of per-thread stack frame in the compiled kernel (register spills land there)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        usage = subprocess.run([CUOBJDUMP, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"STACK:(\d+)", usage).group(1))


def _shared(fn, types: dict[str, str], constexprs: dict, warps: int, stages: int) -> dict:
    """{"shared": bytes of shared memory a block takes, "stack": spill stack per thread,
    "async_copies": the cp.async copies software pipelining made of pointer loads,
    "narrow_loads": global loads of a single 2-byte element in its PTX}."""
    names = fn.arg_names
    sig = {n: types.get(n, "constexpr") for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    # as a launch at the benchmarked shapes specializes them: 16-byte aligned pointers,
    # sizes and strides multiples of 16 (what lets loads be vectorized)
    aligned = {(names.index(n),): [["tt.divisibility", 16]] for n, t in types.items() if t[0] == "*" or t == "i32"}
    kernel = triton.compile(ASTSource(fn, sig, constexprs=consts, attrs=aligned), target=TARGET,
                            options={"num_warps": warps, "num_stages": stages})
    return dict(shared=int(kernel.metadata.shared), stack=_stack(kernel.asm["cubin"]),
                async_copies=kernel.asm["ttgir"].count("ttg.async_copy_global_to_local"),
                narrow_loads=len(NARROW_LOAD.findall(kernel.asm["ptx"])))


def gemm_shared(dt: str, precision: str, meta: dict, warps: int, stages: int, w_kn: bool, rank_pad: int = 16,
                sources: int = 1) -> dict:
    """The GEMM's shared memory and spill stack as `fused_gemm` launches it (TMA store of
    bf16 tiles; the dx GEMM compiled with dropout, except when it sums several products:
    the shared-input call's dx has none)."""
    size = 4 if dt == "fp32" else 2
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    types = {n: "*i32" for n in ("tok_lo", "tok_hi", "seg_start", "seg_end", "seg_off", "seg_rank", "seg_mask_row")}
    types.update({n: "*fp32" for n in ("seg_scale", "seg_keep")})
    types.update({n: "i32" for n in ("M", "N", "K", "M_BUCKET", "RT", "U_STRIDE", "K1", "K2")})
    a_desc = f"tensordesc<{dt}[{bm}, {bk}]>"
    w_desc = f"tensordesc<{dt}[{bk}, {bn}]>" if w_kn else f"tensordesc<{dt}[{bn}, {bk}]>"
    types.update(out_ptr=f"*{dt}", bias_ptr=f"*{dt}", v_cat=f"*{dt}", mask_ptr="*i8",
                 u_ptr="*fp32" if w_kn else f"*{dt}", out_src=f"tensordesc<{dt}[{bm}, {bn}]>",
                 a_src=a_desc, a1_src=a_desc, a2_src=a_desc, w_src=w_desc, w1_src=w_desc, w2_src=w_desc)
    consts = dict(R=rank_pad, W_KN=w_kn, HAS_BIAS=False, DROPOUT=w_kn and sources == 1, USE_TMA=True,
                  PRECISION=precision, V_ALIGNED=True, TMA_STORE=size == 2, SOURCES=sources, **meta)
    return _shared(fused_gemm.fused_gemm_kernel, types, consts, warps, stages)


def persistent_shared(dt: str, meta: dict, warps: int, stages: int, w_kn: bool, rank_pad: int,
                      sources: int = 1, more_segments: bool = False, dropout: bool = False) -> dict:
    """The persistent GEMM (16-bit only: its output leaves through a descriptor, in halves),
    summing one or more (a, W) products, with the
    segment loop for tiles meeting more than two segments or without, with dropout (dx)
    or without."""
    bm, bn, bk = meta["BLOCK_M"], meta["BLOCK_N"], meta["BLOCK_K"]
    types = {n: "*i32" for n in ("tok_lo", "tok_hi", "seg_start", "seg_end", "seg_off", "seg_rank", "seg_mask_row")}
    types.update({n: "*fp32" for n in ("seg_scale", "seg_keep")})
    types.update({n: "i32" for n in ("M", "N", "K", "RT", "U_STRIDE", "K1", "K2")})
    types.update(mask_ptr="*i8")
    a_desc = f"tensordesc<{dt}[{bm}, {bk}]>"
    w_desc = f"tensordesc<{dt}[{bk}, {bn}]>" if w_kn else f"tensordesc<{dt}[{bn}, {bk}]>"
    types.update(a_src=a_desc, w_src=w_desc, a1_src=a_desc, w1_src=w_desc, a2_src=a_desc, w2_src=w_desc,
                 out_ptr=f"*{dt}", out_src=f"tensordesc<{dt}[{bm}, {bn // 2}]>", bias_ptr=f"*{dt}", v_cat=f"*{dt}",
                 u_ptr="*fp32" if w_kn else f"*{dt}")
    consts = dict(R=rank_pad, W_KN=w_kn, HAS_BIAS=not w_kn, PRECISION="tf32", V_ALIGNED=True, NUM_SMS=132,
                  SOURCES=sources, MORE_SEGMENTS=more_segments, DROPOUT=dropout, **meta)
    # what the host launch assumes
    estimate = fused_gemm.persistent_smem(meta, stages, 2)
    return dict(_shared(fused_gemm.fused_gemm_persistent_kernel, types, consts, warps, stages), estimate=estimate)


def shrink_shared(dt: str, precision: str, rank_pad: int, of_b: bool) -> dict:
    """The shrink as the operator launches it at this rank: h = x·Aᵀ (with dropout), or
    g = dy·B (of_b: B's columns read, fp32 out)."""
    cfg = shrink.config(rank_pad, 4 if dt == "fp32" else 2)
    types = {n: "*i32" for n in ("seg_slot", "seg_start", "seg_end", "tile_seg", "tile_row", "seg_mask_row",
                                 "seg_rank", "slot_off")}
    types.update(x_ptr=f"*{dt}", h_ptr="*fp32" if of_b else f"*{dt}", a_cat=f"*{dt}", mask_ptr="*i8",
                 slot_keep="*fp32", K="i32", A_STRIDE="i32")
    consts = dict(R=rank_pad, BLOCK_M=cfg.block_m, BLOCK_K=cfg.block_k, DROPOUT=not of_b, PRECISION=precision,
                  ALIGNED=True, A_T=of_b)
    return _shared(shrink.shrink_kernel, types, consts, cfg.warps, cfg.stages)


def seg_grads_shared(dt: str, precision: str, dy_pass: bool, rank_pad: int, g_tiles: bool = False,
                     paired: bool = False, width: int = 4096) -> dict:
    """The reduction pass with the launch shape the operator picks for this dtype and rank
    (the dy pass with g up to rank 16, or 32 when `paired`, by atomics or, with g_tiles, as
    partials; else dB alone) over a `width`-wide dy in one segment (`seg_grads.narrow_dy`)."""
    size = 4 if dt == "fp32" else 2
    cfg = (seg_grads.dy_pass(size, rank_pad, paired, width=width, segments=1) if dy_pass
           else seg_grads.x_pass(size, rank_pad, precision))
    shrink_g = dy_pass and (rank_pad <= seg_grads.G_IN_DY_PASS_MAX_RANK or paired)
    left = "fp32" if not dy_pass else dt
    types = {n: "*i32" for n in ("item_slot", "item_lo", "item_hi", "item_part", "piece_start", "piece_end",
                                 "piece_seg", "seg_start", "seg_mask_row", "slot_rank", "slot_off")}
    types.update(left_ptr=f"*{left}", right_ptr=f"*{dt}", out_ptr="*fp32",
                 part_ptr="*fp32", g_ptr="*fp32", b_cat=f"*{dt}", mask_ptr="*i8", out_off="*i64",
                 slot_scale="*fp32", slot_keep="*fp32", D="i32", RT="i32", G_ROWS="i32", LEFT_STRIDE="i32",
                 G_STRIDE="i32")
    consts = dict(R=rank_pad, OUT_T=dy_pass, DROPOUT=not dy_pass, SHRINK_G=shrink_g, G_TILES=shrink_g and g_tiles,
                  PRECISION=precision, BLOCK_M=cfg.block_m, BLOCK_D=cfg.block_d, D_MAJOR=cfg.d_major,
                  PAIRED_RED=True)  # g's atomics as sm_90 launches them
    return _shared(seg_grads.seg_grad_kernel, types, consts, cfg.warps, cfg.stages)


RANKS = (16, 32, 64, 128)  # padded ranks: the reductions' configs change with rank × element size
PRECISIONS = [("bf16", "tf32"), ("fp32", "ieee"), ("fp32", "tf32")]  # fp16 compiles as bf16 does


def main() -> None:
    """Every config the GEMM can launch (the autotuner's, fitted to the element size, whose
    first is also the untuned one; that one also at R = 128; true fp32 has one), and the
    shrinks and reductions at every padded rank."""
    rows = []
    for dt, precision in PRECISIONS:
        size = 4 if dt == "fp32" else 2
        for meta, stages, warps in fused_gemm.launch_configs(size, precision=precision):
            for w_kn in (False, True):
                config = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}/{stages}"
                rows.append(dict(kernel="fused_gemm", config=config, dtype=dt, precision=precision, w_kn=w_kn,
                                 **gemm_shared(dt, precision, meta, warps, stages, w_kn)))
        # the untuned config at the largest rank: the epilogue's u and V tiles grow with R
        # (a software-pipelined segment loop once asked for 278 KiB there)
        meta, stages, warps = fused_gemm.fixed_config(size, precision=precision)
        for w_kn in (False, True):
            config = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}/{stages}/R128"
            rows.append(dict(kernel="fused_gemm", config=config, dtype=dt, precision=precision, w_kn=w_kn,
                             **gemm_shared(dt, precision, meta, warps, stages, w_kn, rank_pad=128)))
        # the shared-input call's dx: q, k and v's products in one launch, the stacked expand at R = 64
        rows.append(dict(kernel="fused_gemm", config=f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}/{stages}"
                         "/R64x3", dtype=dt, precision=precision, w_kn=True,
                         **gemm_shared(dt, precision, meta, warps, stages, True, rank_pad=64, sources=3)))
        if dt == "bf16":  # the persistent GEMM: the pair alone, with the segment loop after it (R = 32,
            # the widest pair), every segment looped (R = 64), with dropout (dx), and the shared-input dx
            # (gate and up: 2 products at R = 32; q, k and v: 3 at R = 64)
            tile = f"{meta['BLOCK_M']}x{meta['BLOCK_N']}x{meta['BLOCK_K']}/{stages}"
            variants = [(w_kn, dict(rank_pad=32, more_segments=more)) for w_kn in (False, True) for more in (False, True)]
            variants += [(w_kn, dict(rank_pad=64)) for w_kn in (False, True)]
            variants += [(True, dict(rank_pad=r, dropout=True)) for r in (32, 64)]
            variants += [(True, dict(rank_pad=32, sources=2)), (True, dict(rank_pad=64, sources=3))]
            for w_kn, v in variants:
                name = (f"{tile}/R{v['rank_pad']}" + (f"x{v['sources']}" if "sources" in v else "")
                        + ("/segment-loop" if v.get("more_segments") else "")
                        + ("/dropout" if v.get("dropout") else ""))
                rows.append(dict(kernel="fused_gemm_persistent", config=name,
                                 dtype=dt, precision=precision, w_kn=w_kn,
                                 **persistent_shared(dt, meta, warps, stages, w_kn, **v)))
        for rank_pad in RANKS:
            for of_b in (False, True):
                rows.append(dict(kernel="shrink", config=f"{'g' if of_b else 'h'}/R{rank_pad}", dtype=dt,
                                 precision=precision, **shrink_shared(dt, precision, rank_pad, of_b)))
        for dy_pass in (True, False):
            for rank_pad in RANKS:
                with_g = dy_pass and rank_pad <= seg_grads.G_IN_DY_PASS_MAX_RANK
                kind = ("dB+g" if with_g else "dB") if dy_pass else "dA"
                rows.append(dict(kernel="seg_grads", config=f"{kind}/R{rank_pad}", dtype=dt,
                                 precision=precision, **seg_grads_shared(dt, precision, dy_pass, rank_pad)))
                paired_g = seg_grads.G_IN_DY_PASS_MAX_RANK < rank_pad <= seg_grads.G_PAIRED_MAX_RANK
                if dy_pass and dt == "bf16" and paired_g:
                    rows.append(dict(kernel="seg_grads", config=f"dB+g pairs/R{rank_pad}", dtype=dt,
                                     precision=precision, **seg_grads_shared(dt, precision, True, rank_pad,
                                                                             paired=True)))
                if with_g and dt == "bf16":  # the 16-bit pass's 256-column tiles (wide dy, few segments)
                    rows.append(dict(kernel="seg_grads", config=f"dB+g wide/R{rank_pad}", dtype=dt,
                                     precision=precision,
                                     **seg_grads_shared(dt, precision, True, rank_pad, width=11008)))
                if with_g:  # g as column-tile partials, under torch's deterministic algorithms
                    rows.append(dict(kernel="seg_grads", config=f"dB+g partials/R{rank_pad}", dtype=dt,
                                     precision=precision,
                                     **seg_grads_shared(dt, precision, dy_pass, rank_pad, g_tiles=True)))
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
