"""The fused LoRA linear (kernels/lora_linear.py) against the reference path: outputs and every gradient."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.kernels import lora_linear as kernel


def _pair(model_dtype=torch.float64, dropout=0.0, bias="none", **config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Tanh(), nn.Linear(32, 8, bias=False)).to(model_dtype)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0", "2"], dropout=dropout, bias=bias, **config))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for name in layer.specs:
                layer.lora_B[name].weight.normal_()
    reference = copy.deepcopy(model)
    for _, layer in lk.lora_layers(reference):
        layer.use_fused_kernel = False
    return model, reference


def _run(model, x, seed=1):
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = model(x)
    y.backward(torch.ones_like(y) * torch.linspace(-1, 1, y.shape[-1], dtype=y.dtype))
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


def _count_fused_calls(monkeypatch):
    calls = []
    original = kernel.LoraLinearFunction.apply
    monkeypatch.setattr(kernel.LoraLinearFunction, "apply", lambda *a: calls.append(1) or original(*a))
    return calls


@pytest.mark.parametrize("dropout", [0.0, 0.25])
@pytest.mark.parametrize("bias", ["none", "lora_only"])
def test_fused_equals_reference_fp64(dropout, bias, monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model, reference = _pair(dropout=dropout, bias=bias)
    model.train(), reference.train()
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    y, gx, grads = _run(model, x)
    assert len(calls) == 2  # both layers took the fused path
    y_ref, gx_ref, grads_ref = _run(reference, x)
    assert torch.allclose(y, y_ref, rtol=0, atol=1e-12)
    assert torch.allclose(gx, gx_ref, rtol=0, atol=1e-12)
    assert grads.keys() == grads_ref.keys() and len(grads) == (5 if bias == "lora_only" else 4)  # layer 2 has no bias
    for name in grads:
        assert torch.allclose(grads[name], grads_ref[name], rtol=0, atol=1e-11), name


def test_fused_fp32_within_tolerance_and_no_grad_input():
    model, reference = _pair(model_dtype=torch.float32)
    x = torch.randn(64, 16)
    torch.manual_seed(1)
    y = model(x)  # x needs no grad: the first layer skips dX entirely
    y.sum().backward()
    torch.manual_seed(1)
    reference(x).sum().backward()
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-5, atol=1e-5), n


def test_gpt2_conv1d_transposed_weight(monkeypatch):
    transformers = pytest.importorskip("transformers")
    calls = _count_fused_calls(monkeypatch)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=4)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).double().eval()
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["c_attn", "c_proj", "c_fc"]))
    for _, layer in lk.lora_layers(model):
        nn.init.normal_(layer.lora_B["default"].weight)
    reference = copy.deepcopy(model)
    for _, layer in lk.lora_layers(reference):
        layer.use_fused_kernel = False
    ids = torch.randint(0, 64, (2, 8))
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    assert len(calls) == 4
    ref = reference(input_ids=ids, labels=ids)
    ref.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-12
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, atol=1e-10), n


def test_autocast_bf16_matches_reference_within_bf16_noise(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model, reference = _pair(model_dtype=torch.float32)
    x = torch.randn(32, 16)
    outs = []
    for m in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.bfloat16
        y.float().sum().backward()
        outs.append((y.float(), [p.grad for p in m.parameters() if p.grad is not None]))
    assert len(calls) == 2
    (y, grads), (y_ref, grads_ref) = outs
    assert (y - y_ref).abs().max() <= 0.02 * y_ref.abs().max()
    for g, g_ref in zip(grads, grads_ref):
        assert g.dtype == torch.float32  # fp32 master adapters get fp32 gradients
        assert (g - g_ref).abs().max() <= 0.03 * g_ref.abs().max()


@pytest.mark.parametrize("case", ["learnable", "two-active", "mixed", "merged", "dtype-mismatch"])
def test_cases_outside_the_fused_path_use_the_reference(case, monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model, _ = _pair(model_dtype=torch.float32, learnable_scale=(case == "learnable"),
                     **({"dtype": torch.float64} if case == "dtype-mismatch" else {}))
    x = torch.randn(4, 16)
    if case == "two-active":
        lk.add_adapter(model, lk.LoraConfig(r=2, target_modules=["0", "2"]), "b")
        lk.set_active_adapters(model, ["default", "b"])
    if case == "merged":
        lk.merge(model)
    if case == "mixed":
        lk.forward_mixed(model, x, adapter_names=["default", None, "default", None])
    else:
        model(x)
    assert calls == []


# ---------------------------------------------------------------- the 4-bit base (QLoRA) through the fused op
def _qlora_pair(compute_dtype=None, bias=True):
    from lorakit.layers.quantized import Linear4bit

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 96, bias=bias), nn.Tanh(), nn.Linear(96, 32, bias=False))
    model = nn.Sequential(*[Linear4bit.from_linear(m, compute_dtype=compute_dtype) if isinstance(m, nn.Linear)
                            else m for m in dense])
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["0", "2"]))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora_B["default"].weight.normal_()
    reference = copy.deepcopy(model)
    for _, layer in lk.lora_layers(reference):
        layer.use_fused_kernel = False
    return model, reference


@pytest.mark.parametrize("bias", [True, False])
def test_4bit_base_takes_the_fused_path_and_matches_the_reference(bias, monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model, reference = _qlora_pair(bias=bias)
    x = torch.randn(3, 7, 64)
    y, gx, grads = _run(model, x)
    assert len(calls) == 2
    y_ref, gx_ref, grads_ref = _run(reference, x)
    # same dequantized weight, same fp32 maths; only the order of the additions differs
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 4
    for name in grads:
        assert torch.allclose(grads[name], grads_ref[name], rtol=1e-4, atol=1e-5), name


def test_4bit_fused_path_saves_no_dequantized_weight():
    model, _ = _qlora_pair()
    saved = []

    def pack(t):
        saved.append(tuple(t.shape))
        return t

    x = torch.randn(5, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = model(x)
    y.sum().backward()
    assert saved, "nothing saved at all: the hook did not run"
    assert (96, 64) not in saved and (32, 96) not in saved and (64, 96) not in saved, saved


def test_4bit_autocast_bf16_fused_within_bf16_noise(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model, reference = _qlora_pair()
    x = torch.randn(16, 64)
    outs = []
    for m in (model, reference):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        assert y.dtype == torch.float32  # a 4-bit base answers in its input's dtype (bitsandbytes does too)
        y.float().pow(2).sum().backward()
        outs.append((y.float(), [p.grad for p in m.parameters() if p.grad is not None]))
    assert len(calls) == 2
    (y, grads), (y_ref, grads_ref) = outs
    assert (y - y_ref).abs().max() <= 0.02 * y_ref.abs().max()
    for g, g_ref in zip(grads, grads_ref):
        assert (g - g_ref).abs().max() <= 0.03 * g_ref.abs().max()


def test_4bit_with_another_compute_dtype_keeps_the_reference_path(monkeypatch):
    calls = _count_fused_calls(monkeypatch)
    model, reference = _qlora_pair(compute_dtype=torch.float64)  # x fp32, base computes in fp64
    x = torch.randn(4, 64)
    assert torch.equal(model(x), reference(x))
    assert calls == []


# ------------------------------------------- the merged packed path: D(W) + s * B @ A materialized in one pass
def _reference_lowrank(monkeypatch):
    """Make the merged packed path run on the CPU: the dispatchers return the pure-torch references (the
    Triton kernels' oracles) instead of None. Returns the list of calls."""
    from lorakit.quant import dispatch, int8, nf4

    calls = []

    def four(packed, state, A, B, scale, dtype):
        calls.append("4bit")
        return nf4.dequantize_4bit_lowrank(packed, state, A, B, scale, dtype)

    def eight(codes, scb, A, B, scale, dtype):
        calls.append("8bit")
        return int8.dequantize_8bit_lowrank(codes, scb, A, B, scale, dtype)

    monkeypatch.setattr(dispatch, "dequantize_lowrank", four)
    monkeypatch.setattr(dispatch, "dequantize_8bit_lowrank", eight)
    return calls


def _to_8bit(model):
    from lorakit.layers.quantized import Linear4bit
    from lorakit.layers.quantized8 import Linear8bit

    for _, layer in lk.lora_layers(model):
        base = layer.base_layer
        assert isinstance(base, Linear4bit)
        dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None)
        with torch.no_grad():
            dense.weight.copy_(base.dequantize(torch.float32))
            if base.bias is not None:
                dense.bias.copy_(base.bias)
        layer.base_layer = Linear8bit.from_linear(dense)
    return model


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("bias", [True, False])
def test_merged_packed_path_matches_the_reference(bits, bias, monkeypatch):
    model, reference = _qlora_pair(bias=bias)
    if bits == 8:
        model, reference = _to_8bit(model), _to_8bit(reference)
    calls = _reference_lowrank(monkeypatch)
    x = torch.randn(3, 7, 64)
    y, gx, grads = _run(model, x)
    # two layers: Wm in forward and again for dX in backward, both layers (x needs its gradient)
    assert calls == [f"{bits}bit"] * 4
    y_ref, gx_ref, grads_ref = _run(reference, x)
    # fp32: the update rounded into Wm (fp32) instead of into y; the same function otherwise
    assert torch.allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    assert torch.allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_ref.keys() and len(grads) == 4  # A, B of both layers; the base bias is frozen
    for name in grads:
        err = (grads[name] - grads_ref[name]).abs().max() / grads_ref[name].abs().max()
        assert err < 1e-5, (name, float(err))


def test_merged_packed_path_fp64_is_exact(monkeypatch):
    model, reference = _qlora_pair(compute_dtype=torch.float64)
    model, reference = model.double(), reference.double()
    calls = _reference_lowrank(monkeypatch)
    x = torch.randn(4, 64, dtype=torch.float64)
    y, gx, grads = _run(model, x)
    assert len(calls) == 4
    y_ref, gx_ref, grads_ref = _run(reference, x)
    assert (y - y_ref).abs().max() < 1e-12 and (gx - gx_ref).abs().max() < 1e-12
    for name in grads:
        assert (grads[name] - grads_ref[name]).abs().max() < 1e-11, name


def test_merged_packed_path_with_a_fresh_adapter_is_the_base_bit_for_bit(monkeypatch):
    model, _ = _qlora_pair()
    for _, layer in lk.lora_layers(model):
        nn.init.zeros_(layer.lora_B["default"].weight)
    calls = _reference_lowrank(monkeypatch)
    x = torch.randn(5, 64)
    with torch.no_grad():
        y = model(x)
        with lk.disable_adapters(model):
            y_base = model(x)
    assert calls and torch.equal(y, y_base)


def test_merged_packed_path_saves_no_dense_weight_and_is_skipped_when_it_would_differ(monkeypatch):
    model, _ = _qlora_pair()
    calls = _reference_lowrank(monkeypatch)
    saved = []
    x = torch.randn(5, 64, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(tuple(t.shape)) or t, lambda t: t):
        y = model(x)
    y.sum().backward()
    assert calls and saved
    assert not {(96, 64), (32, 96), (64, 96)} & set(saved), saved
    calls.clear()
    monkeypatch.setattr(kernel, "MERGE_PACKED", False)  # the A/B switch
    model(x)
    assert calls == []
    monkeypatch.setattr(kernel, "MERGE_PACKED", True)
    dropped, _ = _qlora_pair()
    # dropout: the update sees dropout(x), the base x itself: nothing to merge
    for _, layer in lk.lora_layers(dropped):
        layer.lora_dropout["default"] = nn.Dropout(0.5)
    dropped.train()
    dropped(x)
    assert calls == []


@pytest.mark.parametrize("merge", [True, False])
def test_checkpoint_recomputation_keeps_the_weight_for_backward(merge, monkeypatch):
    """With checkpoint_kwargs the recomputed forward's 16-bit weight serves backward: two materializations
    per layer and step instead of three, and the same gradients as without checkpointing."""
    from torch.utils.checkpoint import checkpoint

    from lorakit.layers.quantized import Packed4bit

    model, _ = _qlora_pair()
    calls = _reference_lowrank(monkeypatch)
    plain = []
    original = Packed4bit.dequantize
    monkeypatch.setattr(Packed4bit, "dequantize", lambda self, dtype: plain.append(1) or original(self, dtype))
    monkeypatch.setattr(kernel, "MERGE_PACKED", merge)
    x = torch.randn(6, 64, requires_grad=True)

    def step(run):
        model.zero_grad()
        calls.clear(), plain.clear()
        run(x).pow(2).sum().backward()
        return len(calls) + len(plain), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    n_plain, grads = step(model)
    n_torch, grads_torch = step(lambda t: checkpoint(model, t, use_reentrant=False))
    n_kept, grads_kept = step(lambda t: checkpoint(model, t, **lk.checkpoint_kwargs()))
    assert (n_plain, n_torch, n_kept) == (4, 6, 4)
    for name in grads:
        assert torch.equal(grads_torch[name], grads[name]) and torch.equal(grads_kept[name], grads[name]), name
    assert not kernel.keeping_weights()  # the recomputation's context is left again


@pytest.mark.parametrize("transposed", [True, False])
def test_grad_B_either_order_on_the_cpu_and_lands_in_B_layout(transposed, monkeypatch):
    """dB formed as the transposed (r x out) product (the CPU default) or directly: the reference's values in
    fp64, and the gradient autograd stores is contiguous like B (the transposed view is copied, not kept)."""
    monkeypatch.setattr(kernel, "CPU_TRANSPOSED_GRAD_B", transposed)
    model, reference = _pair(model_dtype=torch.float64)
    x = torch.randn(4, 7, 16, dtype=torch.float64)
    _, _, grads = _run(model, x)
    _, _, grads_ref = _run(reference, x)
    for name, g in grads.items():
        assert torch.allclose(g, grads_ref[name], rtol=0, atol=1e-11), name
    for name, p in model.named_parameters():
        if "lora_B" in name:
            assert p.grad.is_contiguous() and p.grad.abs().sum() > 0, name
