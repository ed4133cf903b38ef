"""The fused GEMM alone (`mlora/ops/kernels/fused_gemm.py`) against its contract in
float64: the base product plus each segment's scaled u·V, masked by dropout, with
further (a, W) products summed; a program per tile, one per SM, split in two; which launch a GEMM takes. On CPU through Triton's interpreter (set up by
test_triton_ops, imported first), at tiles of 16 rows; `check_persistent_modes` runs
compiled on a GPU from `test_triton_ops.run_cuda_checks`.
"""

from __future__ import annotations

import itertools
import os
from contextlib import contextmanager

from test_triton_ops import interpreted, rel  # first: it switches the interpreter on before triton loads

import pytest  # noqa: E402
import torch  # noqa: E402

from mlora.ops import Segment  # noqa: E402


def _expand_reference(a, w, bias, u, v_cat, masks, plan, w_kn: bool, dropout: bool) -> torch.Tensor:
    """The fused GEMM's contract in plain torch (fp64): a·Wᵀ (+bias) or a·W, plus each
    segment's scaled u·V, masked where the segment has a mask row."""
    out = (a.double() @ (w.double() if w_kn else w.double().T))
    if bias is not None:
        out += bias.double()
    ranks, offs = plan.slot_rank.tolist(), plan.slot_off.tolist()
    scales, keeps = plan.slot_scale.tolist(), plan.slot_keep.tolist()
    for j, (s0, s1) in enumerate(zip(plan.seg_start.tolist(), plan.seg_end.tolist())):
        slot = plan.seg_slot[j].item()
        r, off = ranks[slot], offs[slot]
        v = v_cat[off:off + r].double() if w_kn else v_cat[:, off:off + r].double().T
        part = scales[slot] * (u[s0:s1, :r].double() @ v)
        row = plan.seg_mask_row[j].item()
        if dropout and row >= 0:
            part = part * (masks[row:row + s1 - s0].double() != 0) * keeps[slot]
        out[s0:s1] += part
    return out


@interpreted
@pytest.mark.parametrize("w_kn", [False, True], ids=["forward", "dx"])
@pytest.mark.parametrize("use_tma,dtype", [(False, torch.float32), (True, torch.float32), (True, torch.float16)],
                         ids=["pointers", "tma", "tma-fp16-tma-store"])
def test_fused_gemm_matches_its_contract(w_kn: bool, use_tma: bool, dtype: torch.dtype) -> None:
    """The fused GEMM alone against its contract in torch: tiles meeting no segment, one,
    two (one product of depth 2R) and up to five (the rest looped), with bias (forward)
    or dropout masks on some segments only (dx: the masked expand before the main loop),
    rows outside every segment; the output written by plain stores or (TMA, 16-bit)
    through a descriptor, the last row tile cut by its edge."""
    from mlora.ops.kernels import fused_gemm as fg

    assert fg.INTERPRET_META["BLOCK_M"] == 16
    _check_gemm_contract(w_kn, use_tma, dtype)


@interpreted
@pytest.mark.parametrize("w_kn", [False, True], ids=["forward", "dx"])
def test_the_persistent_gemm_matches_the_contract(w_kn: bool, monkeypatch) -> None:
    """16-bit through descriptors, one program per SM walks the tiles (3 programs when
    interpreting, 18 tiles here): the same contract, with bias (forward), rows outside
    every segment, a tile meeting none, the last row tile and the last column tile (40 of
    48 columns: its second half wholly outside) cut by the edges; tiles meeting up to
    five segments (the segment loop after the pair); a rank block of 64 (every segment
    looped); two and three products summed; dropout masks on some segments (dx: the
    masked expand first). With MLORA_TRITON_PERSISTENT=0, or a rank block of 128, the
    tiled kernel runs; any other value than 0 or 1 is refused ("flat", the flattened
    loops measured slower and removed, among them)."""
    with persistent_launches() as launched:
        two_a_tile = (14, 9, 7, 20, 0, 12, 16)  # from row 2 to 80: rows 80-89 (the last row tile) meet none
        _check_gemm_contract(w_kn, True, torch.float16, lengths=two_a_tile, n=40, dropout_on=False)
        assert launched == [(3,)]
        monkeypatch.setenv("MLORA_TRITON_PERSISTENT", "0")
        _check_gemm_contract(w_kn, True, torch.float16, lengths=two_a_tile, n=40, dropout_on=False)
        monkeypatch.delenv("MLORA_TRITON_PERSISTENT")
        _check_gemm_contract(w_kn, True, torch.float16, n=40, ranks=(4, 100, 8))  # rank block 128
        assert launched == [(3,)]
        _check_gemm_contract(w_kn, True, torch.float16, n=40, dropout_on=False)  # rows 16-31 meet five segments
        _check_gemm_contract(w_kn, True, torch.float16, lengths=two_a_tile, n=40, ranks=(4, 40, 8))  # R 64, dropout
        # two and three (a, W) pairs summed (the shared-input dx), u a slice of a wider g
        for more in ((24,), (24, 8)):
            _check_gemm_contract(w_kn, True, torch.float16, lengths=two_a_tile, n=40, dropout_on=False, more=more,
                                 u_slice=True)
        assert launched == [(3,)] * 5
        for value in ("flat", "yes"):
            monkeypatch.setenv("MLORA_TRITON_PERSISTENT", value)
            with pytest.raises(ValueError, match=f"MLORA_TRITON_PERSISTENT must be one of 1, 0, got '{value}'"):
                _check_gemm_contract(w_kn, True, torch.float16, lengths=two_a_tile, n=40, dropout_on=False)
        assert launched == [(3,)] * 5


def test_which_gemms_launch_one_program_per_sm() -> None:
    """`persistent_launch` on an H100 (227 KiB a block) and on a GPU with 99 KiB (sm_120):
    one program per SM with a descriptor store, a rank block up to 64 and room for its
    staging buffer beside the pipeline's; else (or switched off) a program per tile."""
    from mlora.ops.kernels import fused_gemm as fg

    meta, stages, _ = fg.fixed_config(2)  # 128 x 256 x 64, 3 stages
    assert fg.persistent_smem(meta, stages, 2) == 180_224  # what sm_90 compiles: 180,248 (tests/kernel_smem.py)
    h100 = dict(meta=meta, stages=stages, element_size=2, smem_limit=fg.HOPPER_SMEM)
    ok = dict(tma_store=True, rank_pad=64)
    assert fg.persistent_launch("on", **ok, **h100) == "persistent"
    assert fg.persistent_launch("off", **ok, **h100) == "tiled"
    for change in (dict(tma_store=False), dict(rank_pad=128)):
        assert fg.persistent_launch("on", **{**ok, **change}, **h100) == "tiled", change
    small_meta, small_stages, _ = fg.fixed_config(2, 101_376 - fg.SMEM_HEADROOM)  # one stage fits
    small = dict(meta=small_meta, stages=small_stages, element_size=2, smem_limit=101_376)
    assert small_stages == 1 and fg.persistent_launch("on", **ok, **small) == "persistent"
    assert fg.persistent_launch("on", **ok, **{**small, "smem_limit": 80_000}) == "tiled"


@interpreted
@pytest.mark.parametrize("w_kn", [False, True], ids=["forward", "dx"])
def test_the_split_gemm_matches_the_contract(w_kn: bool) -> None:
    """The same contract split in two: the kernel with no K loop writes the LoRA part (with
    bias; masked in dx), and torch's addmm_ adds the base product onto it."""
    _check_gemm_contract(w_kn, False, torch.float32, split=True)


@interpreted
@pytest.mark.parametrize("w_kn", [False, True], ids=["forward", "dx"])
@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
def test_the_true_fp32_tile_matches_the_contract(w_kn: bool, use_tma: bool, monkeypatch) -> None:
    """The GEMM at the tile true fp32 launches on a GPU (`IEEE_SHAPE`, 32 × 64 × 32):
    row tiles then meet up to six segments and the K loop has two steps, one cut short."""
    from mlora.ops.kernels import fused_gemm as fg

    bm, bn, bk, _, _ = fg.IEEE_SHAPE
    monkeypatch.setattr(fg, "INTERPRET_META", dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, GROUP_M=2))
    _check_gemm_contract(w_kn, use_tma, torch.float32)


@interpreted
@pytest.mark.parametrize("w_kn", [False, True], ids=["forward", "dx"])
@pytest.mark.parametrize("use_tma", [False, True], ids=["pointers", "tma"])
def test_the_fused_gemm_sums_further_products_and_reads_u_from_a_slice(w_kn: bool, use_tma: bool) -> None:
    """Two further (a_i, W_i) pairs of other depths (40 + 24 + 8: the last K loop shorter
    than a block) join the sum in one launch, as the shared-input call's dx does, and u is
    read as a column slice of a wider tensor."""
    _check_gemm_contract(w_kn, use_tma, torch.float32, more=(24, 8), u_slice=True)
    a, w = torch.randn(8, 16), torch.randn(16, 16)
    from mlora.ops.kernels import fused_gemm as fg
    from mlora.ops.kernels.plan import segment_plan

    plan = segment_plan((Segment(0, 0, 8),), (1.0,), (0.0,), (False,), (16,), 8, torch.device("cpu"), 16)
    with pytest.raises(ValueError, match="a further product must be a contiguous"):
        fg.fused_gemm(a, w, None, torch.zeros(8, 16), torch.zeros(16, 16), a, plan, w_kn=True, dropout=False,
                      precision="ieee", more=[(torch.randn(8, 4), torch.randn(5, 16))])
    with pytest.raises(ValueError, match="at most 3 products"):
        fg.fused_gemm(a, w, None, torch.zeros(8, 16), torch.zeros(16, 16), a, plan, w_kn=True, dropout=False,
                      precision="ieee", more=[(a, w)] * 3)


def _check_gemm_contract(w_kn: bool, use_tma: bool, dtype: torch.dtype, split: bool = False,
                         more: tuple[int, ...] = (), u_slice: bool = False,
                         lengths: tuple[int, ...] = (3, 12, 2, 5, 3, 0, 30, 9, 4), n: int = 48,
                         dropout_on: bool = True, tokens: int = 90, k: int = 40, device: str = "cpu",
                         tol: float | None = None, ranks: tuple[int, int, int] = (4, 16, 8)) -> torch.Tensor:
    """fused_gemm (or split_gemm) against `_expand_reference` in float64; returns the
    output. The default lengths start at row 2: 16-row tiles then meet up to five
    segments (rows 16-31), rows 80-89 none."""
    from mlora.ops import triton_multi_lora as tm
    from mlora.ops.kernels import fused_gemm as fg
    from mlora.ops.kernels.plan import segment_plan

    gen = torch.Generator().manual_seed(11)
    segs, at = [], 2
    for i, length in enumerate(lengths):
        segs.append(Segment(i % 3, at, at + length))
        at += length
    dropout = (0.0, 0.3, 0.0) if w_kn and dropout_on else (0.0, 0.0, 0.0)
    has = tuple(dropout[s.slot] > 0 for s in segs)
    plan = segment_plan(tuple(segs), (0.5, 2.0, 1.5), dropout, has, ranks, tokens, torch.device(device), 16)
    a = torch.randn(tokens, k, generator=gen)
    w = torch.randn(k, n, generator=gen) if w_kn else torch.randn(n, k, generator=gen)
    bias = None if w_kn else torch.randn(n, generator=gen)
    u = torch.randn(tokens, plan.rank_pad, generator=gen)  # columns past a slot's rank too: V's padding is zero
    if u_slice:  # columns 8.. of a wider tensor, as a member's h or g in the shared-input call
        u = torch.cat([torch.randn(tokens, 8, generator=gen), u, torch.randn(tokens, 8, generator=gen)], 1)[:, 8:-8]
    pairs = [(torch.randn(tokens, k_i, generator=gen).to(dtype),
              (torch.randn(k_i, n, generator=gen) if w_kn else torch.randn(n, k_i, generator=gen)).to(dtype))
             for k_i in more]
    blocks = [torch.randn(r, n, generator=gen) for r in ranks]
    a_cat, b_cat = tm.concat(blocks, [v.T for v in blocks], torch.float32)  # slots at multiples of 8 rows
    v_cat = a_cat if w_kn else b_cat
    masked_rows = sum(s.end - s.start for s, m in zip(segs, has) if m)
    masks = (torch.rand(max(masked_rows, 1), n, generator=gen) > 0.3).to(torch.int8)
    a, w, v_cat, masks = a.to(device, dtype), w.to(device, dtype), v_cat.to(device, dtype), masks.to(device)
    bias = None if bias is None else bias.to(device, dtype)
    u = u.to(device) if w_kn else u.to(device, dtype)  # g stays fp32, as the operator passes it
    pairs = [(a_i.to(device), w_i.to(device)) for a_i, w_i in pairs]
    if split:
        out = fg.split_gemm(a, w, bias, u, v_cat, masks, plan, w_kn=w_kn, dropout=any(has), precision="ieee")
    else:
        out = fg.fused_gemm(a, w, bias, u, v_cat, masks, plan, w_kn=w_kn, dropout=any(has), precision="ieee",
                            use_tma=use_tma, more=pairs)
    assert out.dtype == dtype
    ref = _expand_reference(a, w, bias, u, v_cat, masks, plan, w_kn, any(has))
    for a_i, w_i in pairs:
        ref += a_i.double() @ (w_i.double() if w_kn else w_i.double().T)
    if tol is None:
        tol = 1e-6 if dtype == torch.float32 else 2e-3  # fp16: the output's and u·s's rounding
    assert rel(out, ref) < tol, rel(out, ref)
    return out


@contextmanager
def persistent_launches():
    """The grid of each launch of `fused_gemm_persistent_kernel` inside the block."""
    from mlora.ops.kernels import fused_gemm as fg

    kernel, launched = fg.fused_gemm_persistent_kernel, []

    class Counted:
        def __getitem__(self, grid):
            launched.append(grid)
            return kernel[grid]

    fg.fused_gemm_persistent_kernel = Counted()
    try:
        yield launched
    finally:
        fg.fused_gemm_persistent_kernel = kernel


def check_persistent_modes() -> None:
    """The GEMM one program per SM (the default) and a program per tile, each against the
    fp64 contract, and against each other: 128-row tiles meeting one or two segments, an
    empty segment, rows outside every segment, K cut in its last step, the last column
    tile's second half mostly outside, forward with bias and dx, at rank blocks 16 and 32."""
    lengths = (300, 0, 200, 131, 500, 129, 150)  # rows 2-1411 of 1500: no 128-row tile meets three
    with persistent_launches() as launched:
        for w_kn, ranks in itertools.product((False, True), ((4, 16, 8), (20, 32, 8))):
            outs = {}
            for mode in ("1", "0"):
                os.environ["MLORA_TRITON_PERSISTENT"] = mode
                before = len(launched)
                outs[mode] = _check_gemm_contract(w_kn, True, torch.bfloat16, lengths=lengths, n=648,
                                                  dropout_on=False, tokens=1500, k=520, device="cuda", tol=1e-2,
                                                  ranks=ranks)
                assert len(launched) - before == (mode == "1"), (mode, launched[before:])
            print("ok persistent GEMMs", "dx" if w_kn else "forward", f"ranks {ranks}", "persistent - tiled max",
                  (outs["1"].float() - outs["0"].float()).abs().max().item(), flush=True)
    os.environ.pop("MLORA_TRITON_PERSISTENT", None)
