"""Linear4bit and the QLoRA workflow: quantize_model, load_quantized, prepare_for_kbit_training,
memory_report, LoRA on 4-bit layers (training, adapters on disk, PEFT files onto a 16-bit base), merging."""

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import lorakit as lk
from lorakit.errors import QuantError
from lorakit.layers import Linear4bit
from lorakit.quant import nf4

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def tiny_llama(dtype=torch.bfloat16, tie=False, seed=0):
    # hidden 48 and intermediate 100: rows not multiples of the block, so padding is exercised
    cfg = LlamaConfig(hidden_size=48, intermediate_size=100, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=12, vocab_size=96, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(folder)
    return folder


def ids(n=2, t=16, seed=1):
    return torch.randint(0, 96, (n, t), generator=gen(seed))


# ------------------------------------------------------------------------------------------- Linear4bit
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_forward_is_dequantize_then_matmul(device, dtype):
    lin = nn.Linear(70, 33).to(dtype).to(device)
    q = Linear4bit.from_linear(lin)
    x = torch.randn(5, 70, generator=gen()).to(dtype).to(device)
    w = nf4.dequantize_4bit(q.weight, q.quant_state, dtype)
    with torch.no_grad():
        assert torch.equal(q(x.unsqueeze(0)).squeeze(0), nn.functional.linear(x, w, lin.bias))
    assert q.bias.dtype == dtype and q.absmax.dtype == torch.uint8


def test_backward_gives_input_grads_and_saves_no_dequantized_weight():
    lin = nn.Linear(64, 96, bias=True)
    q = Linear4bit.from_linear(lin)
    q.bias.requires_grad_(True)
    x = torch.randn(3, 7, 64, generator=gen(), requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = q(x)
    assert not any(t.numel() >= 64 * 96 for t in saved)  # neither W nor any copy of it is kept for backward
    g = torch.randn(y.shape, generator=gen(1))
    y.backward(g)
    w = q.dequantize(torch.float32)
    assert torch.equal(x.grad, g @ w)
    assert torch.allclose(q.bias.grad, g.sum((0, 1)))
    assert q.weight.grad is None and not q.weight.requires_grad


def test_compute_dtype_and_output_dtype():
    q = Linear4bit.from_linear(nn.Linear(64, 8).to(torch.bfloat16), compute_dtype=torch.bfloat16)
    x = torch.randn(2, 64, generator=gen())
    y = q(x)  # fp32 input: computed in bf16, returned in fp32 like bitsandbytes
    assert y.dtype == torch.float32
    assert torch.equal(y, nn.functional.linear(x.to(torch.bfloat16), q.dequantize(torch.bfloat16), q.bias).float())


def test_state_dict_uses_bitsandbytes_keys_and_round_trips(tmp_path):
    q = Linear4bit.from_linear(nn.Linear(64, 40).to(torch.bfloat16))
    sd = q.state_dict()
    assert set(sd) == {"weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"}
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "q.safetensors")
    fresh = Linear4bit(64, 40, bias=True, double_quant=False, quant_type="fp4")  # settings come from the state
    from safetensors.torch import load_file

    fresh.load_state_dict(load_file(tmp_path / "q.safetensors"))
    assert fresh.quant_type == "nf4" and fresh.double_quant
    x = torch.randn(3, 64, generator=gen()).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(fresh(x), q(x))


def test_loading_a_state_of_another_shape_fails_clearly():
    q = Linear4bit.from_linear(nn.Linear(64, 40))
    other = Linear4bit(40, 64, bias=True)  # same number of values, transposed shape
    with pytest.raises(QuantError, match=r"shape \(40, 64\).*this layer's weight is \(64, 40\)"):
        other.load_state_dict(q.state_dict())
    with pytest.raises(QuantError, match="expected a weight of shape"):
        other.load_state_dict({"weight": torch.randn(3, 3), "bias": torch.zeros(64)})


def test_float_state_dict_is_quantized_on_load():
    lin = nn.Linear(64, 16)
    q = Linear4bit(64, 16, bias=True, weight_dtype=torch.float32)
    q.load_state_dict(lin.state_dict())
    ref = Linear4bit.from_linear(lin)
    assert torch.equal(q.weight, ref.weight) and torch.equal(q.absmax, ref.absmax)


def test_dtype_casts_leave_the_quant_state_alone():
    q = Linear4bit.from_linear(nn.Linear(64, 16), double_quant=False)
    before = q.absmax.clone()
    q.to(torch.bfloat16).half()
    assert q.absmax.dtype == torch.float32 and torch.equal(q.absmax, before)
    assert q.bias.dtype == torch.float16


def test_bad_settings():
    with pytest.raises(QuantError, match="unknown quant_type"):
        Linear4bit(8, 8, quant_type="nf3")
    with pytest.raises(QuantError, match="blocksize"):
        Linear4bit(8, 8, blocksize=100)
    lin = nn.Linear(8, 8)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(QuantError, match="NaN or Inf"):
        Linear4bit.from_linear(lin, where="blocks.0.fc")


# ------------------------------------------------------------------------------------------- quantize_model
def test_quantize_model_converts_linears_and_keeps_head_and_embeddings():
    model = tiny_llama()
    report = lk.quantize_model(model)
    assert len(report.quantized) == 14 and report.skipped == ["lm_head"]
    assert isinstance(model.model.layers[1].mlp.down_proj, Linear4bit)
    assert type(model.lm_head) is nn.Linear and model.model.embed_tokens.weight.dtype == torch.bfloat16
    shapes = [(m.out_features, m.in_features) for m in model.modules() if isinstance(m, Linear4bit)]
    assert report.bytes_before == sum(2 * o * i for o, i in shapes)
    blocks = [-(-o * i // 64) for o, i in shapes]  # codes + 8-bit absmax + nested absmax + two code books + offset
    assert report.bytes_after == sum(-(-o * i // 2) + b + 4 * -(-b // 256) + 4 * (16 + 256 + 1)
                                     for (o, i), b in zip(shapes, blocks))
    skipped = tiny_llama()
    report = lk.quantize_model(skipped, skip=["down_proj"], quantize_head=True)
    assert "lm_head" in report.quantized and sorted(report.skipped) == ["model.layers.0.mlp.down_proj",
                                                                        "model.layers.1.mlp.down_proj"]


def test_quantize_model_bad_input_changes_nothing():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 3] = float("inf")
    with pytest.raises(QuantError, match="model.layers.1.mlp.up_proj"):
        lk.quantize_model(model)
    assert not any(isinstance(m, Linear4bit) for m in model.modules())  # nothing half-converted
    with pytest.raises(QuantError, match="bits must be 4 or 8"):
        lk.quantize_model(tiny_llama(), bits=3)
    with pytest.raises(QuantError, match="4-bit settings"):
        lk.quantize_model(tiny_llama(), bits=8, quant_type="fp4")
    with pytest.raises(QuantError, match="unknown quant_type"):
        lk.quantize_model(tiny_llama(), quant_type="af4")


# ------------------------------------------------------------------------------------------- load_quantized
def test_load_quantized_equals_quantize_model(checkpoint):
    direct = lk.load_quantized(checkpoint)
    reference = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    lk.quantize_model(reference)
    x = ids()
    with torch.no_grad():
        assert torch.equal(direct(x).logits, reference(x).logits)
    assert all(p.device.type == "cpu" for p in direct.parameters())
    assert direct.model.rotary_emb.inv_freq.device.type == "cpu"


def test_load_quantized_streams_tensor_by_tensor(checkpoint, monkeypatch):
    """Never more than one 16-bit weight alive outside the model: count live 16-bit tensors handed out by the
    checkpoint reader while loading."""
    import safetensors

    live, peak = [], [0]
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *a, **k):
            self.f = real_open(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *a):
            return self.f.__exit__(*a)

        def keys(self):
            return self.f.keys()

        def get_tensor(self, key):
            import weakref

            t = self.f.get_tensor(key)
            if t.dim() == 2 and "embed" not in key and "lm_head" not in key:
                live.append(weakref.ref(t))
                peak[0] = max(peak[0], sum(r() is not None for r in live))
            return t

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    model = lk.load_quantized(checkpoint)
    assert isinstance(model.model.layers[0].self_attn.q_proj, Linear4bit)
    assert peak[0] == 1


def test_load_quantized_reads_prequantized_checkpoints(checkpoint, tmp_path):
    model = lk.load_quantized(checkpoint, quant_type="fp4")
    sd = {k: v.contiguous() for k, v in model.state_dict().items() if "inv_freq" not in k}
    save_file(sd, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    again = lk.load_quantized(tmp_path)  # asks for nf4, but the stored fp4 state is used as is
    assert again.model.layers[0].mlp.up_proj.quant_type == "fp4"
    with torch.no_grad():
        assert torch.equal(again(ids()).logits, model(ids()).logits)


def test_load_quantized_errors(checkpoint, tmp_path):
    with pytest.raises(QuantError, match="no config.json"):
        lk.load_quantized(tmp_path)
    (tmp_path / "config.json").write_text((checkpoint / "config.json").read_text())
    with pytest.raises(QuantError, match="no safetensors"):
        lk.load_quantized(tmp_path)
    from safetensors.torch import load_file

    sd = load_file(checkpoint / "model.safetensors")
    partial = {k: v for k, v in sd.items() if "layers.1.mlp" not in k}
    save_file(partial, tmp_path / "model.safetensors")
    with pytest.raises(QuantError, match="lacks 3 tensors"):
        lk.load_quantized(tmp_path)
    sd["model.layers.0.mlp.up_proj.weight"] = torch.zeros(7, 48, dtype=torch.bfloat16)
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.raises(QuantError, match=r"up_proj.weight.*\(7, 48\).*\(100, 48\)"):
        lk.load_quantized(tmp_path)


# ------------------------------------------------------------------------------------------- training & memory
def test_prepare_for_kbit_training():
    model = tiny_llama(torch.float16)
    lk.quantize_model(model)
    lk.prepare_for_kbit_training(model)
    assert model.is_gradient_checkpointing and not model.config.use_cache
    assert model.model.norm.weight.dtype == torch.float32  # fp16 model: norms upcast
    assert not any(p.requires_grad for p in model.parameters())
    bf = tiny_llama(torch.bfloat16)
    lk.quantize_model(bf)
    lk.prepare_for_kbit_training(bf)
    assert bf.model.norm.weight.dtype == torch.bfloat16  # bf16: HF norms already compute in fp32


def test_memory_report_counts_each_group():
    model = tiny_llama()
    lk.quantize_model(model)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS, dtype=torch.float32))
    rep = lk.memory_report(model)
    q = [m for m in model.modules() if isinstance(m, Linear4bit)]
    assert rep.quantized_weights == sum((m.in_features * m.out_features + 1) // 2 for m in q)
    n_blocks = [-(-m.in_features * m.out_features // 64) for m in q]
    assert rep.quant_state == sum(b + 4 * -(-b // 256) + 16 * 4 + 256 * 4 + 4 for b in n_blocks)
    lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert rep.adapters == 4 * lora
    leftovers = sum(p.numel() * 2 for n, p in model.named_parameters() if not p.requires_grad)
    leftovers += sum(b.numel() * 2 for b in model.buffers() if b.dtype == torch.bfloat16)  # rotary frequencies
    assert rep.other["bfloat16"] == leftovers
    assert rep.total == rep.quantized_weights + rep.quant_state + rep.adapters + sum(rep.other.values())
    assert "quantized weights" in str(rep)


def test_qlora_training_reduces_loss_and_adapters_round_trip(checkpoint, tmp_path):
    model = lk.load_quantized(checkpoint)
    lk.prepare_for_kbit_training(model)
    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules="all-linear", dtype=torch.float32))
    model.train()
    x = ids(4, 24, seed=3)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(25):
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5, losses
    model.eval()
    with torch.no_grad():
        trained = model(x).logits
    lk.save_adapter(model, tmp_path / "adapter")

    # back onto a fresh 4-bit base: the same logits, bit for bit
    again = lk.load_quantized(checkpoint)
    lk.load_adapter(again, tmp_path / "adapter")
    with torch.no_grad():
        assert torch.equal(again(x).logits, trained)

    # the PEFT-format files onto the unquantized bf16 base: lorakit and PEFT agree
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 8
    base = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()
    lk.load_adapter(base, tmp_path / "adapter")
    peft = pytest.importorskip("peft")
    with torch.no_grad():
        ours = base(x).logits.float()
        theirs = peft.PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval(), tmp_path / "adapter"
        )(x).logits.float()
        plain = LlamaForCausalLM.from_pretrained(checkpoint, dtype=torch.bfloat16).eval()(x).logits.float()
    assert (ours - theirs).abs().max() < 0.05  # bf16 models, different summation order
    assert (ours - plain).abs().max() > 0.5  # the adapter does act on the 16-bit base
    assert (ours - trained.float()).norm() / trained.float().norm() < 0.2  # close to the 4-bit result


# ------------------------------------------------------------------------------------------- merging
def _adapted(seed=0):
    model = tiny_llama(seed=seed)
    lk.quantize_model(model)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=TARGETS))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora_B["default"].weight.normal_(0, 0.05, generator=gen(7))
    return model


def test_merge_to_dense_is_exact():
    model = _adapted()
    layer = model.model.layers[0].mlp.up_proj
    expected = (layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")).to(torch.bfloat16)
    with torch.no_grad():
        before = model(ids()).logits.float()
    lk.merge_to_dense(model, torch.bfloat16)
    assert not any(isinstance(m, (Linear4bit, lk.LoraLayer)) for m in model.modules())
    merged = model.model.layers[0].mlp.up_proj
    assert type(merged) is nn.Linear and merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight, expected)  # one rounding of the fp32 sum
    with torch.no_grad():
        after = model(ids()).logits.float()
    assert (after - before).norm() / before.norm() < 0.02


def test_merge_requantized_reports_error_and_unmerge_restores():
    model = _adapted()
    layer = model.model.layers[1].self_attn.q_proj
    exact = layer.base_layer.dequantize(torch.float32) + layer.delta_weight("default")
    snapshot = layer.base_layer.weight.clone()
    errors = lk.merge_requantized(model)
    assert len(errors) == 14 and set(errors["model.layers.1.self_attn.q_proj"]) == {"mean_abs", "max_abs", "rel_fro"}
    got = layer.base_layer.dequantize(torch.float32)
    err = (got - exact.detach()).abs()
    assert errors["model.layers.1.self_attn.q_proj"]["max_abs"] == pytest.approx(float(err.max()))
    assert 0 < errors["model.layers.1.self_attn.q_proj"]["rel_fro"] < 0.15  # NF4's own error, no more
    lk.unmerge(model)

    kept = _adapted()
    kl = kept.model.layers[1].self_attn.q_proj
    original = kl.base_layer.weight.clone()
    with torch.no_grad():
        out = kept(ids()).logits
    lk.merge(kept, keep_original=True)
    assert not torch.equal(kl.base_layer.weight, original)
    lk.unmerge(kept)
    assert torch.equal(kl.base_layer.weight, original)  # bit for bit through the snapshot
    with torch.no_grad():
        assert torch.equal(kept(ids()).logits, out)
    assert snapshot.shape == original.shape
