"""The fused multi-LoRA Triton kernels against the reference loop.

On CPU every kernel path runs through Triton's interpreter at small odd shapes:
empty segments, tiles straddling segment boundaries, tokens outside every segment,
mixed ranks (up to 128), a slot with several segments, 256 segments over 64 slots,
bias or none, dropout masks,
slots split over several reduction items, and both GEMM main loops (pointers, and
TMA descriptors where the shapes are aligned). Forward, dx, dA and dB are checked
directly and through `multi_lora_linear(..., backend="triton")` and autograd. The fused
GEMM alone against its contract: tests/test_fused_gemm.py.

With a CUDA device the same checks run compiled, at larger shapes, in a fresh
process (the interpreter is switched on for this whole process), bf16/fp16 against an
fp32 reference of the same rounded inputs: relative error < 1e-2.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

INTERPRETED = os.environ.get("MLORA_TRITON_COMPILED") != "1"
if INTERPRETED:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from mlora.ops import Segment, multi_lora_linear  # noqa: E402
from mlora.ops.multi_lora import LoraCall, reference_backward, reference_forward  # noqa: E402

# The CPU cases run the kernels in Triton's interpreter, which MLORA_TRITON_COMPILED=1
# leaves off (that setting runs the CUDA checks in this process instead).
interpreted = pytest.mark.skipif(not INTERPRETED, reason="the CPU kernel cases need Triton's interpreter, "
                                 "which MLORA_TRITON_COMPILED=1 leaves off")


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int
    d_in: int
    d_out: int
    ranks: tuple[int, ...]
    lengths: tuple[int, ...]  # segment lengths in token order; a negative length is a gap of uncovered tokens
    slots: tuple[int, ...]  # slot of each non-gap entry of `lengths`
    bias: bool
    dropout: tuple[float, ...]
    use_tma: bool | None = None


def layout(case: Case) -> tuple[Segment, ...]:
    segs, at, k = [], 0, 0
    for length in case.lengths:
        if length < 0:
            at -= length
            continue
        segs.append(Segment(case.slots[k], at, at + length))
        at, k = at + length, k + 1
    assert at <= case.tokens
    return tuple(segs)


CPU_CASES = [
    # gaps, empty segments, straddling 16-row tiles, dropout on three slots, bias
    Case("mixed", 61, 45, 29, (4, 1, 8, 20), (7, 0, -2, 21, 3, -7, 18), (0, 2, 1, 3, 0), True, (0.1, 0.0, 0.3, 0.2)),
    # aligned widths: the TMA-descriptor main loop; rank 128 pads R to 128; slot 0 twice
    Case("tma", 50, 48, 32, (16, 5, 128), (9, 14, 0, 11, -3, 13), (0, 1, 2, 0, 2), False, (0.0, 0.25, 0.0), True),
    # wide ranks, all multiples of 8: g as a shrink of dy by B, read 16 bytes at a time (as is
    # B in the forward GEMM); the GEMM's segment loop at R = 64
    Case("wide-by-8", 75, 40, 48, (64, 8, 24), (20, 0, 17, -5, 30), (0, 1, 2, 0), False, (0.0, 0.2, 0.0)),
    # one job over every token: its reductions are split into items and summed in order
    Case("one-job", 70, 33, 40, (16,), (70,), (0,), True, (0.0,)),
    # many short segments (lengths 0..5), six slots interleaved, first tokens uncovered
    Case("many", 90, 17, 23, (2, 3, 4, 6, 12, 16),
         (-4, 5, 0, 3, 1, 4, 2, 5, 5, 3, 0, 1, 4, 2, 5, 3, 1, 4, 5, 2, 3, 4, 5, 1, 3, 4, 2, -1),
         (0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1), True,
         (0.5, 0.0, 0.1, 0.0, 0.2, 0.0)),
    # the upper end: 256 segments (lengths 0..4, some uncovered gaps) over 64 slots of ranks 4, 8, 16
    Case("256-segments", 560, 24, 20, tuple((4, 8, 16)[i % 3] for i in range(64)),
         tuple(n for i in range(256) for n in ((-2,) if i % 40 == 7 else ()) + ((i * 7) % 5,)),
         tuple((i * 13) % 64 for i in range(256)), False, tuple(0.1 if i % 16 == 3 else 0.0 for i in range(64))),
]


def make(case: Case, dtype: torch.dtype, device: str, seed: int):
    gen = torch.Generator().manual_seed(seed)
    segs = layout(case)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * scale).to(dtype).to(device)

    x = rnd(case.tokens, case.d_in)
    w = rnd(case.d_out, case.d_in, scale=case.d_in**-0.5)
    b = rnd(case.d_out) if case.bias else None
    a = [rnd(r, case.d_in, scale=case.d_in**-0.5) for r in case.ranks]
    bb = [rnd(case.d_out, r, scale=r**-0.5) for r in case.ranks]
    masks = [
        (torch.rand(s.end - s.start, case.d_in, generator=gen) >= case.dropout[s.slot]).to(device)
        if case.dropout[s.slot] else None
        for s in segs
    ]
    scales = tuple(0.5 + 0.25 * i for i in range(len(case.ranks)))
    call = LoraCall(segs, scales, case.dropout, tuple(m is not None for m in masks))
    dy = rnd(case.tokens, case.d_out)
    return x, w, b, a, bb, masks, call, dy


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert torch.isfinite(out).all()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def check_direct(case: Case, dtype: torch.dtype, device: str, seed: int, tol: float) -> None:
    """forward / backward against the reference run in fp32 on the same rounded inputs."""
    from mlora.ops import triton_multi_lora as tm

    x, w, b, a, bb, masks, call, dy = make(case, dtype, device, seed)
    up = [t.float() if t is not None else None for t in (x, w, b, dy)]
    a32, b32 = [t.float() for t in a], [t.float() for t in bb]
    y, h = tm.forward_keep_shrink(x, w, b, a, bb, masks, call, use_tma=case.use_tma)
    y_ref = reference_forward(up[0], up[1], up[2], a32, b32, masks, call)
    assert y.dtype == dtype and rel(y, y_ref) < tol, (case.name, "y", rel(y, y_ref))
    dx_ref, da_ref, db_ref = reference_backward(up[3], up[0], up[1], a32, b32, masks, call, True)
    dxs = []
    for saved in (h, None):  # h kept from forward, and recomputed
        dx, da, db = tm.backward(dy, x, w, a, bb, masks, call, True, h=saved, use_tma=case.use_tma)
        dxs.append(dx)
        assert rel(dx, dx_ref) < tol, (case.name, "dx", rel(dx, dx_ref))
        for i in range(len(case.ranks)):
            assert da[i].shape == a[i].shape and db[i].shape == bb[i].shape
            if da_ref[i].abs().max() == 0:  # a slot without tokens: exact zeros
                assert da[i].abs().max() == 0 and db[i].abs().max() == 0
                continue
            assert rel(da[i], da_ref[i]) < tol, (case.name, "dA", i, rel(da[i], da_ref[i]))
            assert rel(db[i], db_ref[i]) < tol, (case.name, "dB", i, rel(db[i], db_ref[i]))
    # without dx; dB again bit for bit (no atomics feed it), and dA too unless g was summed
    # over d_out's column tiles by atomics (their order may vary between runs on a GPU)
    dx_none, da2, db2 = tm.backward(dy, x, w, a, bb, masks, call, False, h=h, use_tma=case.use_tma)
    assert dx_none is None and all(torch.equal(p, q) for p, q in zip(db, db2))
    assert all(rel(p, q) < tol for p, q in zip(da2, da_ref) if q.abs().max() > 0)
    if g_mode(case, dtype) != "atomics":  # and dx too, which reads g
        assert torch.equal(dxs[0], dxs[1]) and all(torch.equal(p, q) for p, q in zip(da, da2)), case.name


def g_mode(case: Case, dtype: torch.dtype) -> str:
    from mlora.ops.kernels import seg_grads
    from mlora.ops.kernels.plan import rank_block

    r = rank_block(case.ranks)
    size = torch.tensor([], dtype=dtype).element_size()
    paired = torch.cuda.is_available() and seg_grads.paired_red(torch.device("cuda"), size)
    cfg = seg_grads.dy_pass(size, r, paired, width=case.d_out, segments=sum(s.end > s.start for s in layout(case)))
    return seg_grads.g_mode(r, case.tokens, case.d_out, cfg.block_d,
                            torch.are_deterministic_algorithms_enabled(), paired)


@contextmanager
def deterministic():
    """torch's deterministic algorithms on for the block (warnings only for other ops)."""
    was, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn)


def check_autograd(case: Case, dtype: torch.dtype, device: str, seed: int, tol: float) -> None:
    """multi_lora_linear on the Triton backend with fp32 master adapters, through autograd."""
    x, w, b, a, bb, masks, call, dy = make(case, dtype, device, seed)

    def run(backend: str, cast: torch.dtype):
        xl = x.detach().to(cast).clone().requires_grad_()  # fresh leaves: no grad shared between runs
        al = [t.detach().float().clone().requires_grad_() for t in a]
        bl = [t.detach().float().clone().requires_grad_() for t in bb]
        y = multi_lora_linear(xl, w.to(cast), None if b is None else b.to(cast), al, bl, call.scales,
                              call.segments, dropout=call.dropout, dropout_masks=masks, backend=backend)
        (y.float() * dy.float()).sum().backward()
        return [y, xl.grad, *(t.grad for t in al), *(t.grad for t in bl)]

    got, ref = run("triton", dtype), run("loop", torch.float32)
    assert got[0].dtype == dtype and got[2].dtype == torch.float32
    for k, (o, r) in enumerate(zip(got, ref)):
        if r.abs().max() == 0:
            assert o.abs().max() == 0
        else:
            assert rel(o, r) < tol, (case.name, k, rel(o, r))


def test_cpu_cases_reach_every_reduction_path() -> None:
    """The cases above drive each branch of the reductions: an item of several pieces,
    slots split into items whose fp32 partials are summed, and, with dropout on, pieces
    with a mask and pieces without one in the same launch."""
    from mlora.ops.kernels import seg_grads
    from mlora.ops.kernels.plan import item_plan, rank_block

    seen = set()
    for case in CPU_CASES:
        for width in (case.d_in, case.d_out):
            cfg = seg_grads.x_pass(4, rank_block(case.ranks))
            items = item_plan(layout(case), width, rank_block(case.ranks), torch.device("cpu"), cfg.block_m,
                              cfg.block_d, 8, 16 << 20)
            pieces = (items.item_hi - items.item_lo).tolist()
            parts = items.item_part.tolist()
            if any(n > 1 and part < 0 for n, part in zip(pieces, parts)):
                seen.add("pieces")
            if any(part >= 0 for part in parts):
                seen.add("partials")
        masked = {case.dropout[s.slot] > 0 for s in layout(case) if s.end > s.start}
        if masked == {True, False}:
            seen.add("masked and unmasked")
    assert seen == {"pieces", "partials", "masked and unmasked"}


def test_g_goes_in_pairs_only_compiled_and_where_no_thread_holds_copies() -> None:
    """The paired reductions are sm_90 PTX: never interpreted or off CUDA, and only at
    launch shapes where each thread holds whole wgmma fragments of g's share (the GPU
    checks measure g at such shapes and one without)."""
    from mlora.ops.kernels import seg_grads as sg

    assert not sg.paired_red(torch.device("cpu"), 2)
    shipped = sg.PassConfig(block_m=64, block_d=256, warps=4, stages=3, per_sm=1, d_major=True)
    assert sg.pairs_fit(shipped, 16) and sg.pairs_fit(dataclasses.replace(shipped, warps=8), 16)
    assert not sg.pairs_fit(dataclasses.replace(shipped, block_m=32, warps=8), 16)  # 2 elements a thread
    assert not sg.pairs_fit(dataclasses.replace(shipped, warps=8), 8)


def test_the_compiled_dy_pass_takes_128_columns_at_most_4096_wide_or_16_segments(monkeypatch) -> None:
    """The 16-bit rank-16 dy pass as the GPU launches it: 256-column tiles only for a dy
    wider than 4096 in fewer than 16 segments (the 7B MLP's four jobs), 128 otherwise;
    either way each thread holds whole fragments of g's share, as its paired atomics need."""
    from mlora.ops.kernels import seg_grads as sg

    monkeypatch.setattr(sg, "INTERPRET", False)
    for width, segments, block_d in ((4096, 1, 128), (4096, 64, 128), (11008, 4, 256), (11008, 16, 128)):
        cfg = sg.dy_pass(2, 16, True, width=width, segments=segments)
        assert cfg.block_d == block_d and cfg.d_major and sg.pairs_fit(cfg, 16), (width, segments, cfg)
    assert sg.dy_pass(4, 16, width=4096, segments=1).block_d == 256  # fp32: unchanged


def test_concat_pads_each_slot_to_a_multiple_of_8() -> None:
    """The kernels read every slot's adapter from an offset that is a multiple of 8 (and
    tell the compiler so): ranks 5, 16, 3 lie at rows 0, 8, 24 of A_cat (columns of
    B_cat), 32 in all, zeros past each rank; the plan's offsets say the same."""
    from mlora.ops import triton_multi_lora as tm
    from mlora.ops.kernels.plan import segment_plan

    gen = torch.Generator().manual_seed(4)
    ranks = (5, 16, 3)
    a = [torch.randn(r, 7, generator=gen) for r in ranks]
    b = [torch.randn(6, r, generator=gen) for r in ranks]
    a_cat, b_cat = tm.concat(a, b, torch.bfloat16)
    assert a_cat.shape == (32, 7) and b_cat.shape == (6, 32) and a_cat.dtype == torch.bfloat16
    for blocks, cat, rows in ((a, a_cat, True), (b, b_cat, False)):
        for block, off, width, r in zip(blocks, (0, 8, 24), (8, 16, 8), ranks):
            got = cat[off:off + width] if rows else cat[:, off:off + width].T
            want = block.to(torch.bfloat16) if rows else block.T.to(torch.bfloat16)
            assert torch.equal(got[:r], want) and not got[r:].any()
    segs = tuple(Segment(i, 4 * i, 4 * i + 4) for i in range(3))
    plan = segment_plan(segs, (1.0,) * 3, (0.0,) * 3, (False,) * 3, ranks, 12, torch.device("cpu"), 16)
    assert plan.slot_off.tolist() == [0, 8, 24] and plan.rank_total == 32
    assert plan.slot_rank.tolist() == [5, 16, 3] and plan.seg_rank.tolist() == [8, 16, 8]
    dense_a, _ = tm.concat(a[1:2], b[1:2], torch.float32)  # a multiple of 8 already: no padding
    assert torch.equal(dense_a, a[1])


@interpreted
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: c.name)
def test_kernels_match_reference(case: Case) -> None:
    check_direct(case, torch.float32, "cpu", seed=1, tol=1e-5)


@interpreted
@pytest.mark.parametrize("case", CPU_CASES[:2], ids=lambda c: c.name)
def test_autograd_triton_backend(case: Case) -> None:
    check_autograd(case, torch.float32, "cpu", seed=2, tol=1e-5)


@interpreted
@pytest.mark.parametrize("case", [c for c in CPU_CASES if c.name in ("one-job", "many")], ids=lambda c: c.name)
def test_kernels_match_reference_with_split_gemms(case: Case, monkeypatch) -> None:
    """The operator with its GEMMs split (the LoRA part from Triton, the base product from
    torch's addmm_) instead of fused (the default: one Triton GEMM for both)."""
    from mlora.ops import triton_multi_lora as tm

    monkeypatch.setenv("MLORA_TRITON_BASE", "split")
    assert tm.base_gemm() == "split"
    check_direct(case, torch.float32, "cpu", seed=1, tol=1e-5)


def test_the_base_gemm_is_fused_unless_asked_otherwise(monkeypatch) -> None:
    from mlora.ops import triton_multi_lora as tm

    monkeypatch.delenv("MLORA_TRITON_BASE", raising=False)
    assert tm.base_gemm() == "fused"
    monkeypatch.setenv("MLORA_TRITON_BASE", "cublas")
    with pytest.raises(ValueError, match="MLORA_TRITON_BASE='cublas': use one of fused, split"):
        tm.base_gemm()


@interpreted
def test_backward_lets_the_adapter_copies_go_before_the_da_pass(monkeypatch) -> None:
    """The autograd path keeps A_cat and B_cat (the adapters' padded copies) on ctx rather
    than saved, and backward drops each once read for the last time: by the dA pass,
    after the dx GEMM, neither is alive, so they never sit beside dx and the gradients
    (at K = 64, 4096², 16 MiB of the operator's peak). Gradients as the loop's; a second
    backward through the same graph is refused with a message."""
    import weakref

    from mlora.ops import triton_multi_lora as tm
    from mlora.ops.kernels import seg_grads as grads

    copies: list[weakref.ref] = []
    alive_at_da_pass: list[list[bool]] = []
    concat, seg_grads = tm.concat, grads.seg_grads

    def recorded_concat(*args):
        cats = concat(*args)
        copies.extend(weakref.ref(t) for t in cats)
        return cats

    def recorded_seg_grads(*args, transposed: bool, **kwargs):
        if not transposed:  # the dA pass (the dy pass is the transposed one)
            alive_at_da_pass.append([ref() is not None for ref in copies])
        return seg_grads(*args, transposed=transposed, **kwargs)

    monkeypatch.setattr(tm, "concat", recorded_concat)
    monkeypatch.setattr(grads, "seg_grads", recorded_seg_grads)
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(40, 24, generator=gen)
    w = torch.randn(16, 24, generator=gen)
    a = [torch.randn(r, 24, generator=gen) * 0.3 for r in (5, 12)]  # padded to 8 and 16: copies
    b = [torch.randn(16, r, generator=gen) * 0.3 for r in (5, 12)]
    segs = [Segment(0, 0, 18), Segment(1, 18, 40)]
    dy = torch.randn(40, 16, generator=gen)
    got, want = {}, {}
    for backend, out in (("triton", got), ("loop", want)):
        leaves = [t.clone().requires_grad_() for t in (x, *a, *b)]
        y = multi_lora_linear(leaves[0], w, None, leaves[1:3], leaves[3:], [2.0, 0.5], segs, backend=backend)
        y.backward(dy, retain_graph=True)
        out["y"], out["grads"] = y.detach(), [t.grad for t in leaves]
        if backend == "triton":
            with pytest.raises(RuntimeError, match=r"backward through it twice \(retain_graph=True\) is not"):
                y.backward(dy)
    assert len(copies) == 2 and alive_at_da_pass == [[False, False]]
    assert torch.allclose(got["y"], want["y"], atol=1e-5)
    for g_got, g_want in zip(got["grads"], want["grads"]):
        assert torch.allclose(g_got, g_want, atol=1e-4), (g_got - g_want).abs().max()


@interpreted
def test_half_precision_interpreted() -> None:
    check_direct(CPU_CASES[0], torch.float16, "cpu", seed=3, tol=1e-2)


def test_g_by_atomics_or_in_order_under_torchs_deterministic_algorithms() -> None:
    """g = dy·B at rank 16: the dy pass adds each column tile's share by atomics; under
    torch.use_deterministic_algorithms it stores them as partials summed in order by a
    second kernel (8 MiB at T = 8192, d_out = 4096), or, past G_PARTIALS_MAX_BYTES, g is
    a shrink of dy, as at wider ranks."""
    from mlora.ops.kernels import seg_grads

    assert seg_grads.g_partials_bytes(16, 8192, 4096, 256) == 8 << 20
    assert seg_grads.g_mode(16, 8192, 4096, 256) == "atomics"
    assert seg_grads.g_mode(16, 8192, 4096, 256, deterministic=True) == "partials"
    assert seg_grads.g_mode(16, 8192, 14336, 256, deterministic=True) == "partials"
    assert seg_grads.g_mode(16, 65536, 14336, 256, deterministic=True) == "shrink"
    assert seg_grads.g_mode(32, 8192, 4096, 128) == seg_grads.g_mode(32, 8192, 4096, 128, True) == "shrink"
    # g's atomics in pairs (sm_90, 16-bit) pay up to R = 32, not under the deterministic algorithms
    assert seg_grads.g_mode(32, 8192, 4096, 128, paired=True) == "atomics"
    assert seg_grads.g_mode(32, 8192, 4096, 128, True, paired=True) == "shrink"
    assert seg_grads.g_mode(64, 8192, 4096, 128, paired=True) == "shrink"
    assert {g_mode(c, torch.float32) for c in CPU_CASES} == {"atomics", "shrink"}
    with deterministic():
        assert {g_mode(c, torch.float32) for c in CPU_CASES} == {"partials", "shrink"}


@interpreted
@pytest.mark.parametrize("case", [c for c in CPU_CASES if c.name in ("one-job", "many")], ids=lambda c: c.name)
def test_kernels_match_reference_deterministic(case: Case) -> None:
    with deterministic():
        assert g_mode(case, torch.float32) == "partials"
        check_direct(case, torch.float32, "cpu", seed=1, tol=1e-5)


CUDA_CASES = [
    Case("cuda-mixed", 1031, 520, 384, (4, 1, 8, 20, 64), (100, 0, -37, 301, 3, -7, 500), (0, 2, 1, 3, 4), True,
         (0.1, 0.0, 0.3, 0.2, 0.0)),
    Case("cuda-odd", 777, 333, 211, (16, 7), (400, -17, 300), (0, 1), False, (0.0, 0.1)),
    Case("cuda-rank128", 1500, 1024, 512, (128, 16, 32), (200, 700, 0, 500, -100), (0, 1, 2, 0), False,
         (0.0, 0.0, 0.0)),
    Case("cuda-one-job", 4099, 1024, 1024, (16,), (4099,), (0,), True, (0.0,)),
    Case("cuda-64-jobs", 2048, 512, 768, (16,) * 64, tuple(32 for _ in range(64)), tuple(range(64)), False,
         (0.0,) * 64),
    Case("cuda-256-segments", 4100, 256, 384, tuple((4, 8, 16, 64)[i % 4] for i in range(128)),
         tuple(n for i in range(256) for n in ((-9,) if i % 50 == 3 else ()) + ((i * 37) % 31,)),
         tuple((i * 11) % 128 for i in range(256)), True, tuple(0.2 if i % 32 == 1 else 0.0 for i in range(128))),
    # rank block 32: g by the dy pass's atomics where they go in pairs (sm_90), else a shrink of dy
    Case("cuda-rank32", 1300, 512, 768, (32, 17, 24), (300, -20, 500, 380), (0, 1, 2), True, (0.0, 0.1, 0.0)),
]


def check_g_by_launch_shape() -> None:
    """g = dy·B_slot from the dy pass's atomics against torch, at the shipped launch shape
    and others: 32-row tiles at 8 warps hold fewer elements than threads (copies), where the
    paired reductions must stay off (`seg_grads.pairs_fit`); a rank of 7 masks half a pair."""
    from mlora.ops import triton_multi_lora as tm
    from mlora.ops.kernels import seg_grads as sg
    from mlora.ops.kernels import shrink as sh
    from mlora.ops.kernels.plan import item_plan, padded_rank, segment_plan

    dev, tokens, width, ranks = torch.device("cuda"), 1000, 768, (16, 7)
    gen = torch.Generator(device=dev).manual_seed(9)
    segs = (Segment(0, 3, 400), Segment(1, 400, 410), Segment(0, 420, 997))  # rows 0-2, 410-419, 997-999 in none
    plan = segment_plan(segs, (2.0, 0.5), (0.0, 0.0), (False,) * 3, ranks, tokens, dev, sh.block_m(16))
    dy = torch.randn(tokens, width, device=dev, generator=gen).bfloat16()
    h = torch.randn(tokens, plan.rank_pad, device=dev, generator=gen).bfloat16()
    b = [torch.randn(width, r, device=dev, generator=gen).bfloat16() for r in ranks]
    _, b_cat = tm.concat([torch.zeros(r, 1, device=dev) for r in ranks], b, torch.bfloat16)
    want = torch.zeros(tokens, plan.rank_pad, device=dev)
    offs = [0, padded_rank(ranks[0])]
    for seg in segs:
        r = ranks[seg.slot]
        b_slot = b_cat[:, offs[seg.slot]:offs[seg.slot] + r].float()
        want[seg.start:seg.end, :r] = dy[seg.start:seg.end].float() @ b_slot
    off, ends = tm._offset_table(ranks, width, dev)
    shipped = sg.dy_pass(2, plan.rank_pad, width=width, segments=len(segs))  # 128 columns (`narrow_dy`)
    wide = sg.dy_pass(2, plan.rank_pad, width=11008, segments=len(segs))  # 256, as the 7B MLP's takes
    for cfg in (shipped, wide, sg.PassConfig(64, 256, 8, 3, 2, True), sg.PassConfig(32, 128, 8, 3, 2, True),
                sg.PassConfig(32, 128, 4, 3, 2, True), sg.PassConfig(128, 128, 8, 3, 1, True)):
        items = item_plan(segs, width, plan.rank_pad, dev, cfg.block_m, cfg.block_d,
                          tm._target_programs(dev, cfg.per_sm), tm.PARTIAL_BUDGET_BYTES)
        g = torch.zeros(tokens, plan.rank_pad, device=dev)
        d_b = torch.empty(ends[-1], device=dev)
        sg.seg_grads(h, dy, d_b, off, plan, items, cfg, transposed=True, masks=dy, dropout=False, precision="tf32",
                     g=g, b_cat=b_cat)
        assert rel(g, want) < 1e-5, (cfg, sg.pairs_fit(cfg, plan.rank_pad), rel(g, want))
    assert sg.pairs_fit(shipped, plan.rank_pad) and not sg.pairs_fit(sg.PassConfig(32, 128, 8, 3, 2, True), 16)
    print("ok g at six launch shapes", flush=True)


def run_cuda_checks() -> None:
    """Compiled kernels on the GPU; called in a process without the interpreter."""
    from mlora.ops.kernels import seg_grads

    # sm_90 adds g two elements an instruction (inline PTX; ranks 7 and 1 below mask half a pair)
    assert seg_grads.paired_red(torch.device("cuda"), 2) == (torch.cuda.get_device_capability()[0] >= 9)
    assert not seg_grads.paired_red(torch.device("cuda"), 4)  # fp32: scalar atomics
    for case in CUDA_CASES:
        check_direct(case, torch.bfloat16, "cuda", seed=5, tol=1e-2)
        print("ok bf16", case.name, flush=True)
    check_g_by_launch_shape()
    from test_fused_gemm import check_persistent_modes

    check_persistent_modes()
    os.environ["MLORA_PAIRED_RED"] = "0"  # one element an atomic, as on GPUs before sm_90
    seg_grads.paired_red.cache_clear()
    try:
        for case in CUDA_CASES[:2]:
            check_direct(case, torch.bfloat16, "cuda", seed=5, tol=1e-2)
    finally:
        del os.environ["MLORA_PAIRED_RED"]
        seg_grads.paired_red.cache_clear()
    print("ok bf16, g by scalar atomics", flush=True)
    check_direct(CUDA_CASES[0], torch.float16, "cuda", seed=6, tol=1e-2)
    check_direct(CUDA_CASES[1], torch.float32, "cuda", seed=6, tol=1e-4)
    # fp32 at rank 128: the shrink's stages fitted to shared memory (4 of them would take 320 KiB)
    check_direct(CUDA_CASES[2], torch.float32, "cuda", seed=6, tol=1e-4)
    check_autograd(CUDA_CASES[0], torch.bfloat16, "cuda", seed=7, tol=1e-2)
    print("ok fp16, fp32 and autograd", flush=True)
    from mlora.ops import triton_multi_lora as tm

    with tm.base_gemm_set("split"):  # the default fuses the GEMMs; the split ones too
        for case in CUDA_CASES[:3]:
            check_direct(case, torch.bfloat16, "cuda", seed=5, tol=1e-2)
        check_direct(CUDA_CASES[1], torch.float32, "cuda", seed=6, tol=1e-4)
    print("ok split GEMMs", flush=True)
    with deterministic():  # g summed in order: dA bit for bit between two backward passes
        for case in CUDA_CASES[3:5]:
            assert g_mode(case, torch.bfloat16) == "partials"
            check_direct(case, torch.bfloat16, "cuda", seed=8, tol=1e-2)
    print("ok deterministic", flush=True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_on_cuda() -> None:
    if not INTERPRETED:  # Triton compiles in this process: no second one needed
        run_cuda_checks()
        return
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "MLORA_TRITON_COMPILED": "1", "MLORA_TRITON_AUTOTUNE": "0",
           "PYTHONPATH": f"{root}{os.pathsep}{root / 'tests'}"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", "import test_triton_ops as t; t.run_cuda_checks()"],
                          env=env, cwd=root, capture_output=True, text=True, timeout=900, check=False)
    print(proc.stdout)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]
