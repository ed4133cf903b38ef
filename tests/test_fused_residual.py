"""The residual adds folded into the RMSNorms: against Hugging Face's add-then-norm and
against the decoder blocks' own forward, values and gradients.

On the CPU the kernels run under Triton's interpreter at small odd shapes (the blocks'
attention and MLP then run their own code). With MLORA_TRITON_COMPILED=1 on a CUDA
machine the same checks run compiled, at model widths, in bf16, plus a whole stage
against the stage with no fused ops.
"""

from __future__ import annotations

import os

COMPILED = os.environ.get("MLORA_TRITON_COMPILED") == "1"
if not COMPILED:
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere in this process

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from transformers import AutoModelForCausalLM  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaRMSNorm  # noqa: E402

from mlora.ops.fused_residual import add_rms_norm, fusable, run_layers, unhooked  # noqa: E402

from conftest import rel  # noqa: E402

DEVICE = torch.device("cuda" if COMPILED else "cpu")
SHAPES = [(4096, 4096), (1000, 2048)] if COMPILED else [(5, 37), (3, 300)]
DTYPES = [torch.bfloat16, torch.float16, torch.float32] if COMPILED else [torch.float32, torch.bfloat16]
if COMPILED and not torch.cuda.is_available():
    pytest.skip("MLORA_TRITON_COMPILED=1 needs a CUDA device", allow_module_level=True)



def frozen_norm(width: int, dtype: torch.dtype, gen: torch.Generator) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(width, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=gen) + 0.5)
    return norm.to(DEVICE, dtype).requires_grad_(False)


@pytest.mark.parametrize("rows, width", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("used", ["both", "normed", "sum"])
def test_add_rms_norm_matches_add_then_norm(rows, width, dtype, used):
    gen = torch.Generator().manual_seed(rows * width)
    r0, d0 = ((torch.randn(2, rows, width, generator=gen) * 3).to(DEVICE, dtype) for _ in range(2))
    ds, dy = (torch.randn(2, rows, width, generator=gen).to(DEVICE, dtype) for _ in range(2))
    norm = frozen_norm(width, dtype, gen)
    rr, dr = r0.clone().requires_grad_(), d0.clone().requires_grad_()
    rf, df = r0.clone().requires_grad_(), d0.clone().requires_grad_()
    want_s = rr + dr
    want_y = norm(want_s)
    got_s, got_y = add_rms_norm(rf, df, norm.weight, norm.variance_epsilon)
    assert got_s.dtype == want_s.dtype and got_y.dtype == want_y.dtype and got_y.shape == want_y.shape
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    if COMPILED or dtype == torch.float32:  # the interpreter rounds to bf16 towards zero, not to nearest
        assert torch.equal(got_s, want_s)  # the sum is rounded to the input dtype as torch's add rounds it
    assert rel(got_s, want_s) < tol
    assert rel(got_y, want_y) < tol
    outputs = {"both": ((want_s, want_y), (got_s, got_y)), "normed": ((want_y,), (got_y,)), "sum": ((want_s,), (got_s,))}
    grads = {"both": (ds, dy), "normed": (dy,), "sum": (ds,)}[used]
    want_out, got_out = outputs[used]
    torch.autograd.backward(want_out, grads)
    torch.autograd.backward(got_out, grads)
    assert rel(rf.grad, rr.grad) < tol and rel(df.grad, dr.grad) < tol
    assert torch.equal(rf.grad, df.grad)


def test_add_rms_norm_refuses_bad_inputs():
    weight = torch.ones(3, device=DEVICE)
    with pytest.raises(ValueError, match="one shape and dtype"):
        add_rms_norm(torch.zeros(2, 3, device=DEVICE), torch.zeros(3, 3, device=DEVICE), weight, 1e-6)
    with pytest.raises(ValueError, match="frozen weights"):
        add_rms_norm(torch.zeros(2, 3, device=DEVICE), torch.zeros(2, 3, device=DEVICE),
                     torch.ones(3, device=DEVICE, requires_grad=True), 1e-6)


def _blocks(path, dtype):
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").to(DEVICE, dtype).eval()
    model.requires_grad_(False)
    for layer in model.model.layers:  # a trainable linear in every block: its gradient crosses the fused norms
        layer.self_attn.o_proj.weight.requires_grad_(True)
        layer.mlp.up_proj.weight.requires_grad_(True)
    return model


def _fused_against_own(inner, params, seq, seed, fused, own) -> int:  # type: ignore[no-untyped-def]
    """Run `fused(hidden, kwargs)` and `own(hidden, kwargs)` on the same random hidden
    states and output gradient: values, the input's gradient and every parameter's
    agree. Returns how many gradients were compared (a part not run has none)."""
    gen = torch.Generator().manual_seed(seed)
    width = inner.config.hidden_size
    hidden0 = torch.randn(2, seq, width, generator=gen).to(DEVICE)
    grad_out = torch.randn(2, seq, width, generator=gen).to(DEVICE)
    positions = torch.arange(seq, device=DEVICE).unsqueeze(0)
    kwargs = dict(attention_mask=None, position_ids=positions, position_embeddings=inner.rotary_emb(hidden0, positions))

    def run(forward) -> tuple[torch.Tensor, list[torch.Tensor]]:  # type: ignore[no-untyped-def]
        hidden = hidden0.clone().requires_grad_()
        out = forward(hidden, kwargs)
        out.backward(grad_out)
        grads = [hidden.grad] + [p.grad for p in params if p.grad is not None]
        for p in params:
            p.grad = None
        return out, grads

    want, want_grads = run(own)
    got, got_grads = run(fused)
    tol = 1e-2 if COMPILED else 1e-5
    assert rel(got, want) < tol
    assert len(got_grads) == len(want_grads)
    for g, w in zip(got_grads, want_grads):
        assert rel(g, w) < tol
    return len(got_grads)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("last", [True, False])
def test_run_layers_equals_the_blocks_own_forward(tiny_models, arch, last):
    model = _blocks(tiny_models[arch], torch.float32)
    inner = model.model
    assert fusable(inner.layers, inner.norm)
    final = inner.norm if last else None

    def own(hidden, kwargs):  # type: ignore[no-untyped-def]
        for layer in inner.layers:
            hidden = layer(hidden, **kwargs)
        return final(hidden) if last else hidden

    params = [p for p in model.parameters() if p.requires_grad]
    _fused_against_own(inner, params, 11, 3, lambda h, kw: run_layers(inner.layers, h, final, **kw), own)


@pytest.mark.parametrize("held", [[("mlp",), ("attention", "mlp"), ("attention",)], [("attention",)], [("mlp",)]])
def test_run_layers_over_a_cut_inside_blocks_equals_the_parts_own_forward(tiny_models, held):
    """A pipeline stage that begins at a block's MLP or ends after its attention: the
    fused adds give what the halves' own add-then-norm gives, values and gradients."""
    from mlora.model.block_parts import run_part

    model = _blocks(tiny_models["llama"], torch.float32)
    inner = model.model
    layers = list(inner.layers)[1 : 1 + len(held)]
    assert fusable(layers, None, held) and unhooked(layers, None, held)

    def own(hidden, kwargs):  # type: ignore[no-untyped-def]
        for layer, parts in zip(layers, held):
            for part in parts:
                hidden = run_part(layer, part, hidden, **kwargs)
        return hidden

    params = [p for layer in layers for p in layer.parameters() if p.requires_grad]
    compared = _fused_against_own(inner, params, 9, 4, lambda h, kw: run_layers(layers, h, None, held, **kw), own)
    assert compared == 1 + sum(len(parts) for parts in held)  # the input's, and one trainable linear per part run
    if held == [("attention",)]:  # a stage's block without its MLP needs no post-attention norm
        del layers[0].post_attention_layernorm
        assert fusable(layers, None, held) and not fusable(layers, None)


def test_run_layers_with_no_blocks_is_the_norm_or_nothing():
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(3, 4, 37, generator=gen).to(DEVICE)
    norm = frozen_norm(37, torch.float32, gen)
    assert torch.equal(run_layers([], hidden, None), hidden)
    assert rel(run_layers([], hidden, norm), norm(hidden)) < 1e-5


def test_only_known_blocks_with_frozen_norms_are_fusable(tiny_models):
    model = _blocks(tiny_models["llama"], torch.float32)
    inner = model.model
    assert fusable(inner.layers, None)
    assert not fusable([torch.nn.Linear(2, 2)], None)
    inner.norm.weight.requires_grad_(True)
    assert not fusable(inner.layers, inner.norm)
    inner.layers[0].post_attention_layernorm.weight.requires_grad_(True)
    assert not fusable(inner.layers, None)


def test_hooks_on_blocks_or_norms_keep_the_blocks_own_forward(tiny_models):
    inner = _blocks(tiny_models["llama"], torch.float32).model
    assert unhooked(inner.layers, inner.norm)
    for module in (inner.layers[1], inner.layers[0].post_attention_layernorm, inner.norm):
        handle = module.register_forward_hook(lambda *args: None)
        assert not unhooked(inner.layers, inner.norm)
        handle.remove()
    handle = inner.layers[0].register_forward_pre_hook(lambda *args: None)
    assert not unhooked(inner.layers)
    handle.remove()
    handle = torch.nn.modules.module.register_module_forward_hook(lambda *args: None)
    assert not unhooked(inner.layers)
    handle.remove()
    assert unhooked(inner.layers, inner.norm)


@pytest.mark.skipif(not COMPILED, reason="a stage takes the fused path only on CUDA")
@pytest.mark.parametrize("last", [True, False, "cut"])
def test_a_stage_with_fused_residual_adds_equals_one_without(tiny_models, last):
    from mlora.model.lora_linear import BatchLayout, JobRows, StageAdapter
    from mlora.model.stage import StageBounds, load_stage

    n_layers = AutoModelForCausalLM.from_pretrained(tiny_models["llama"]).config.num_hidden_layers
    bounds = StageBounds(0, n_layers, True, True) if last is True else StageBounds(0, n_layers - 1, True, False)
    if last == "cut":  # from block 0's MLP to block 2's attention (cuts inside blocks)
        bounds = StageBounds.from_halves(1, 5, True, False)
    outs, grads = [], []
    for fused in (True, False):
        stage = load_stage(tiny_models["llama"], bounds, dtype="bfloat16", device="cuda")
        assert stage.fused_residual
        stage.fused_residual = fused
        shapes = stage.linear_shapes(("q_proj", "v_proj", "down_proj"))
        adapter = StageAdapter.create("job", 8, 16, 0.0, False, shapes, 0, device=torch.device("cuda"))
        with torch.no_grad():  # B is zero at creation: give the adapter something to do
            for b in adapter.b.values():
                b.copy_(torch.randn(b.shape, generator=torch.Generator().manual_seed(b.numel())) * 0.1)
        stage.routing.adapters["job"] = adapter
        ids = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(0)).cuda()
        out = stage(ids, BatchLayout(2, 13, (JobRows("job", 0, 2, 13, 0),)))
        out.float().square().mean().backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten().float() for p in adapter.parameters()]))
    assert rel(outs[0], outs[1]) < 1e-2
    assert rel(grads[0], grads[1]) < 2e-2
