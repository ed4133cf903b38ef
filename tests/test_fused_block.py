"""Fused RMSNorm and SwiGLU kernels against Hugging Face's modules, forward and backward.

On the CPU the kernels run under Triton's interpreter at small odd shapes. With
MLORA_TRITON_COMPILED=1 on a CUDA machine the same checks run compiled, at model
widths, in bf16 (`MLORA_TRITON_COMPILED=1 python -m pytest tests/test_fused_block.py`).
"""

from __future__ import annotations

import os

COMPILED = os.environ.get("MLORA_TRITON_COMPILED") == "1"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from mlora.ops.fused_block import fuse_block_ops, rms_norm, swiglu  # noqa: E402

from conftest import rel  # noqa: E402

DEVICE = torch.device("cuda" if COMPILED else "cpu")
SHAPES = [(4096, 4096), (1000, 11008)] if COMPILED else [(5, 37), (3, 300)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if COMPILED else [torch.float32, torch.bfloat16]
if COMPILED and not torch.cuda.is_available():
    pytest.skip("MLORA_TRITON_COMPILED=1 needs a CUDA device", allow_module_level=True)



@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm_matches_the_hf_module(rows, width, dtype):
    gen = torch.Generator().manual_seed(rows + width)
    x = (torch.randn(2, rows, width, generator=gen) * 3).to(DEVICE, dtype)
    dy = torch.randn(2, rows, width, generator=gen).to(DEVICE, dtype)
    norm = LlamaRMSNorm(width, eps=1e-5).to(DEVICE, dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=gen) + 0.5)
    norm.weight.requires_grad_(False)
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    want = norm(xr)
    got = rms_norm(xf, norm.weight, norm.variance_epsilon)
    want.backward(dy)
    got.backward(dy)
    assert got.dtype == want.dtype and got.shape == want.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got, want) < tol
    assert rel(xf.grad, xr.grad) < tol


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_swiglu_matches_silu_times_up(rows, width, dtype):
    gen = torch.Generator().manual_seed(7 * rows + width)
    g0 = (torch.randn(rows, width, generator=gen) * 3).to(DEVICE, dtype)
    u0 = torch.randn(rows, width, generator=gen).to(DEVICE, dtype)
    dh = torch.randn(rows, width, generator=gen).to(DEVICE, dtype)
    gr, ur = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    gf, uf = g0.clone().requires_grad_(), u0.clone().requires_grad_()
    want = torch.nn.functional.silu(gr) * ur
    got = swiglu(gf, uf)
    want.backward(dh)
    got.backward(dh)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert rel(got, want) < tol
    assert rel(gf.grad, gr.grad) < tol and rel(uf.grad, ur.grad) < tol


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="one shape and dtype"):
        swiglu(torch.zeros(2, 3, device=DEVICE), torch.zeros(3, 2, device=DEVICE))
    with pytest.raises(ValueError, match="frozen weights"):
        rms_norm(torch.zeros(2, 3, device=DEVICE), torch.ones(3, device=DEVICE, requires_grad=True), 1e-6)


@pytest.mark.skipif(COMPILED, reason="checks the CPU fallback")
def test_fusing_a_model_keeps_its_cpu_output(tiny_models):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).eval()
    ids = torch.randint(3, 500, (2, 9))
    with torch.no_grad():
        before = model(input_ids=ids).logits
    counts = fuse_block_ops(model)
    n = model.config.num_hidden_layers
    assert counts == {"rms_norm": 2 * n + 1, "swiglu": n, "attention": n}
    with torch.no_grad():
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)  # off CUDA every module keeps its own forward
    assert set(model.state_dict()) == set(AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).state_dict())
