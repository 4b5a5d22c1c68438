"""8-bit bases: row-wise absmax int8 in bitsandbytes' format (lorakit.quant.int8, Linear8bit), LoRA on top."""

import copy
import importlib.util

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.errors import QuantError
from lorakit.kernels import lora_linear as kernel
from lorakit.layers import Linear8bit
from lorakit.quant.int8 import dequantize_8bit, quantize_8bit

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32, seed=0):
    cfg = LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def ids(n=2, t=16, seed=1):
    return torch.randint(0, 96, (n, t), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------------- the format
def test_golden_codes_and_scales():
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [-2.0, 1.0, 0.004, 2.0]])
    codes, scb = quantize_8bit(w)
    assert scb.tolist() == [1.0, 0.0, 2.0]
    # round half to even, as torch.round (and bitsandbytes): -63.5 -> -64; 0.254 -> 0
    assert codes.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0], [-127, 64, 0, 127]]
    assert codes.dtype == torch.int8 and scb.dtype == torch.float32
    back = dequantize_8bit(codes, scb)
    assert back[1].abs().sum() == 0  # an all-zero row stays zero (bitsandbytes would make NaN codes)
    assert back[0, 0].item() == pytest.approx(1.0, abs=1e-7)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_error_within_half_a_step_per_row_and_idempotent(dtype):
    w = (torch.randn(64, 300, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    codes, scb = quantize_8bit(w)
    back = dequantize_8bit(codes, scb)
    step = scb / 127
    err = (back - w.float()).abs()
    assert bool((err <= step[:, None] / 2 * (1 + 1e-5) + 1e-7).all())  # rounding to the nearest code
    assert float(err.mean() / w.float().abs().mean()) < 0.01  # ~16x finer than NF4 (~0.09 relative)
    codes2, scb2 = quantize_8bit(back)
    assert torch.equal(codes2, codes) and torch.allclose(scb2, scb, rtol=1e-6)


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes not installed")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_bit_identical_to_bitsandbytes(dtype):
    import bitsandbytes.functional as bnb_f

    w = (torch.randn(40, 130, generator=torch.Generator().manual_seed(2)) * 2).to(dtype)
    codes, scb = quantize_8bit(w)
    bnb_codes, bnb_scb, _ = bnb_f.int8_vectorwise_quant(w.clone())
    assert torch.equal(codes, bnb_codes) and torch.equal(scb, bnb_scb)
    assert torch.equal(dequantize_8bit(codes, scb), bnb_f.int8_vectorwise_dequant(bnb_codes, bnb_scb))


@pytest.mark.parametrize("bad,match", [(torch.tensor([[1.0, float("nan")]]), "NaN or Inf"),
                                       (torch.ones(2, 3, dtype=torch.int32), "floating-point"),
                                       (torch.ones(4), "2-D")])
def test_bad_weights_raise(bad, match):
    with pytest.raises(QuantError, match=match):
        quantize_8bit(bad)


# ------------------------------------------------------------------------------------------- Linear8bit
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_forward_backward_and_casts(dtype):
    lin = nn.Linear(70, 33).to(dtype)
    q = Linear8bit.from_linear(lin)
    x = torch.randn(5, 70, dtype=dtype, requires_grad=True)
    w = dequantize_8bit(q.weight, q.SCB, dtype)
    y = q(x)
    assert torch.equal(y, nn.functional.linear(x, w, lin.bias))
    y.sum().backward()
    assert torch.allclose(x.grad, torch.ones(5, 33, dtype=dtype) @ w)
    q.to(torch.float16)  # a dtype cast moves the bias, never the codes or the fp32 scales
    assert q.weight.dtype == torch.int8 and q.SCB.dtype == torch.float32 and q.bias.dtype == torch.float16


def test_state_dict_has_bitsandbytes_keys_and_round_trips():
    q = Linear8bit.from_linear(nn.Linear(20, 7))
    state = q.state_dict()
    assert set(state) == {"weight", "SCB", "weight_format", "bias"}
    assert state["weight"].dtype == torch.int8 and int(state["weight_format"]) == 0
    fresh = Linear8bit(20, 7, weight_dtype=torch.float32)
    fresh.load_state_dict(state)
    assert torch.equal(fresh.weight, q.weight) and torch.equal(fresh.SCB, q.SCB) and torch.equal(fresh.bias, q.bias)
    dense = nn.Linear(20, 7)
    from_float = Linear8bit(20, 7)
    from_float.load_state_dict(dense.state_dict())  # a 16/32-bit weight is quantized on the way in
    assert torch.equal(from_float.weight, quantize_8bit(dense.weight)[0])
    with pytest.raises(QuantError, match="shape"):
        Linear8bit(20, 8).load_state_dict(state)
    with pytest.raises(QuantError, match="row-major"):
        Linear8bit(20, 7).load_state_dict({**state, "weight_format": torch.tensor(1, dtype=torch.uint8)})
    with pytest.raises(QuantError, match="row scales"):
        Linear8bit(20, 7).load_state_dict({k: v for k, v in state.items() if k != "SCB"}, strict=False)


# ------------------------------------------------------------------------------------------- LoRA on 8 bits
def test_quantize_model_8bit_report_and_memory():
    model = tiny_llama(torch.bfloat16)
    report = lk.quantize_model(model, bits=8)
    layers = [m for m in model.modules() if isinstance(m, Linear8bit)]
    assert len(layers) == 14 and len(report.quantized) == 14 and "lm_head" in report.skipped
    values = sum(m.in_features * m.out_features for m in layers)
    assert report.bytes_after == values + 4 * sum(m.out_features for m in layers)
    mem = lk.memory_report(model)
    assert mem.quantized_weights == values and mem.quantized_params == values
    assert 8.0 < mem.bits_per_quantized_param < 8.0 + 32 / 48 + 1e-9


def test_lora_on_8bit_fused_equals_reference_and_trains(monkeypatch):
    calls = []
    original = kernel.LoraLinearFunction.apply
    monkeypatch.setattr(kernel.LoraLinearFunction, "apply", lambda *a: calls.append(1) or original(*a))
    model = tiny_llama()
    lk.quantize_model(model, bits=8)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    for _, layer in lk.lora_layers(model):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.02)
    reference = copy.deepcopy(model)
    for _, layer in lk.lora_layers(reference):
        layer.use_fused_kernel = False
    x = ids()
    model.train(), reference.train()
    out = model(input_ids=x, labels=x)
    out.loss.backward()
    assert len(calls) == 14  # every projection took the fused op over its int8 base
    ref = reference(input_ids=x, labels=x)
    ref.loss.backward()
    assert abs(out.loss.item() - ref.loss.item()) < 1e-5
    for (n, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        if p.grad is not None:
            assert torch.allclose(p.grad, q.grad, rtol=1e-4, atol=1e-6), n
    # a few AdamW steps on one batch: the loss falls
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_merge_into_8bit_base_dense_and_requantized():
    model = tiny_llama()
    lk.quantize_model(model, bits=8)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=TARGETS))
    for _, layer in lk.lora_layers(model):
        nn.init.normal_(layer.lora_B["default"].weight, std=0.05)
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
    requant = copy.deepcopy(model)
    errors = lk.merge_requantized(requant)
    assert len(errors) == 14 and all(e["rel_fro"] < 0.01 for e in errors.values())
    with torch.no_grad():
        assert torch.allclose(requant(input_ids=x).logits, want, atol=0.05)
    lk.merge_to_dense(model)
    assert not any(isinstance(m, Linear8bit) for m in model.modules())
    with torch.no_grad():
        assert torch.allclose(model(input_ids=x).logits, want, atol=1e-4)


# ------------------------------------------------------------------------------------------- load_quantized
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama8")
    tiny_llama(torch.bfloat16).save_pretrained(folder)
    return folder


def test_load_quantized_8bit_equals_quantize_model_and_reads_its_own_files(checkpoint, tmp_path):
    from safetensors.torch import save_file

    direct = lk.load_quantized(checkpoint, bits=8)
    assert sum(isinstance(m, Linear8bit) for m in direct.modules()) == 14
    reference = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    lk.quantize_model(reference, bits=8)
    x = ids()
    with torch.no_grad():
        want = reference(x).logits
        assert torch.equal(direct(x).logits, want)
    # an 8-bit checkpoint (bitsandbytes' Linear8bitLt keys: weight int8, SCB, weight_format) loads unchanged
    (tmp_path / "q8").mkdir()
    (tmp_path / "q8" / "config.json").write_text((checkpoint / "config.json").read_text())
    state = {k: v.contiguous() for k, v in reference.state_dict().items() if k != "lm_head.weight"}
    state["lm_head.weight"] = reference.lm_head.weight.detach().clone()
    save_file(state, str(tmp_path / "q8" / "model.safetensors"))
    again = lk.load_quantized(tmp_path / "q8", bits=8)
    with torch.no_grad():
        assert torch.equal(again(x).logits, want)
    with pytest.raises(QuantError, match="bits=8"):
        lk.load_quantized(tmp_path / "q8")  # int8 codes into a 4-bit model: a clear error
    with pytest.raises(QuantError, match="bits must be 4 or 8"):
        lk.load_quantized(checkpoint, bits=2)
