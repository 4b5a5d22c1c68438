"""Fused MLP blocks (lorakit.blocks, kernels/gated_mlp.py): same numbers as the per-layer path, less stored.

* a tiny Llama (SiLU, closed-form backward) and GPT-2 (gelu_new, autograd on the recomputation): loss and
  every gradient bit-identical to the unfused path in fp32, close in bf16;
* every registered Hugging Face MLP class computes what its own forward computes (a guard against a
  transformers release changing one);
* the op itself against float64 autograd (gradcheck), with bias, transposed weight, ungated;
* the memory claim: the tensors a LoRA step saves for backward, counted by a saved-tensors hook, are fewer
  bytes than the frozen floor's with the fused block and more without;
* installation follows the adapters: unload, delete_adapter, disable, merge, dropout fall back or remove it.
"""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit import activation_memory, blocks, registry, widen
from lorakit.kernels import gated_mlp, shared_input

transformers = pytest.importorskip("transformers")

LLAMA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(dtype=torch.float32, seed=0):
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=100, head_dim=16, attn_implementation="sdpa")
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def tiny_gpt2(seed=0):
    cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100, n_positions=32,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(cfg)


def with_lora(model, targets, **config):
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets, **config))
    with torch.no_grad():  # B random: with B == 0 half of the gradients would be zero and prove nothing
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model.train()


def step(model, seed=1):
    torch.manual_seed(seed)
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def fused_and_unfused(model):
    unfused = copy.deepcopy(model)
    blocks.unfuse(unfused)
    return model, unfused


def count_fused_calls(monkeypatch, which=("down",)):
    """Calls of the blocks' ops: ``down`` (the MLP's LoraMlpDownFunction, the down op's GEMM node), ``down
    inputs`` (its first node, LoraMlpDownInputs), ``shared`` (LoraSharedInputFunction:
    gate/up, q/k/v)."""
    calls = []
    for name, fn in (("down", gated_mlp.LoraMlpDownFunction), ("down inputs", gated_mlp.LoraMlpDownInputs),
                     ("shared", shared_input.LoraSharedInputFunction)):
        if name in which:
            monkeypatch.setattr(fn, "apply", lambda *a, _o=fn.apply: calls.append(1) or _o(*a))
    return calls


GPT2_BLOCK = registry.MlpBlock(gate=None, up="c_fc", down="c_proj", act="act", dropout="dropout")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_fused_block_is_bit_identical_in_fp32(family, monkeypatch):
    """The down-projection op alone (the projections as their own layers) runs the unfused path's ops: the
    same bits."""
    monkeypatch.setattr(blocks, "SHARED_INPUT", False)
    if family == "llama":
        model = with_lora(tiny_llama(), LLAMA_TARGETS)
    else:  # not registered (registry says why): registered here for the ungated, generic-activation case
        from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

        monkeypatch.setitem(registry._MLP_BLOCKS, GPT2MLP, GPT2_BLOCK)
        model = with_lora(tiny_gpt2(), ["c_attn", "c_proj", "c_fc"])
    assert blocks.sync(model) == 2
    fused, unfused = fused_and_unfused(model)
    calls = count_fused_calls(monkeypatch)
    loss_f, grads_f = step(fused)
    assert len(calls) == 2  # both layers' MLPs took the fused op
    loss_u, grads_u = step(unfused)
    assert len(calls) == 2
    assert torch.equal(loss_f, loss_u)
    assert grads_f.keys() == grads_u.keys() and len(grads_f) > 0
    for name in grads_f:
        assert torch.equal(grads_f[name], grads_u[name]), name


def test_fused_block_under_gradient_checkpointing(monkeypatch):
    monkeypatch.setattr(blocks, "SHARED_INPUT", False)
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=lk.checkpoint_kwargs())
    fused, unfused = fused_and_unfused(model)
    gemm_calls = count_fused_calls(monkeypatch)
    input_calls = count_fused_calls(monkeypatch, ("down inputs",))
    loss_f, grads_f = step(fused)
    assert len(input_calls) == 4  # forward and recomputation, two layers
    assert len(gemm_calls) == 2  # forward only: the recomputation stops once G, U, XA are saved again
    loss_u, grads_u = step(unfused)
    assert torch.equal(loss_f, loss_u)
    for name in grads_f:
        assert torch.equal(grads_f[name], grads_u[name]), name


def test_fused_block_bf16_matches_unfused(monkeypatch):
    monkeypatch.setattr(blocks, "SHARED_INPUT", False)
    fused, unfused = fused_and_unfused(with_lora(tiny_llama(torch.bfloat16), LLAMA_TARGETS))
    loss_f, grads_f = step(fused)
    loss_u, grads_u = step(unfused)
    assert torch.equal(loss_f, loss_u)  # the forward runs the same ops
    for name in grads_f:  # the backward too, on the CPU; on CUDA the Triton kernel rounds as torch does
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=1e-2, atol=1e-3)


def _registered(table):
    """(model_type, class, entry) for each entry of one of registry's Hugging Face tables whose class exists
    in the installed transformers."""
    out = []
    for model_type, (cls_name, entry) in table.items():
        try:
            module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        except ImportError:
            continue
        if hasattr(module, cls_name):
            out.append((model_type, getattr(module, cls_name), entry))
    return out


@pytest.mark.parametrize("model_type,cls,block", _registered(registry._HF_MLP_BLOCKS), ids=lambda v: v if isinstance(v, str) else "")
def test_every_registered_mlp_class_computes_its_own_forward(model_type, cls, block):
    config = transformers.AutoConfig.for_model(model_type)
    for name, value in dict(hidden_size=24, intermediate_size=40, mlp_bias=False).items():
        if hasattr(config, name):
            setattr(config, name, value)
    torch.manual_seed(0)
    mlp = cls(config)
    parent = nn.Sequential(mlp).train()
    targets = [n for n in (block.gate, block.up, block.down) if n is not None]
    with_lora(parent, targets)
    assert registry.mlp_block(mlp) is block and blocks.sync(parent) == 1
    x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(1), requires_grad=True)
    y_fused = parent(x)
    y_fused.square().sum().backward()
    grads_fused = [x.grad.clone()] + [p.grad.clone() for p in parent.parameters() if p.requires_grad]
    x.grad = None
    parent.zero_grad(set_to_none=True)
    y_class = type(mlp).forward(mlp, x)  # the class's own code
    y_class.square().sum().backward()
    grads_class = [x.grad] + [p.grad for p in parent.parameters() if p.requires_grad]
    torch.testing.assert_close(y_fused, y_class, rtol=1e-6, atol=1e-6)
    for a, b in zip(grads_fused, grads_class):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("act", ["silu", "gelu"])
def test_op_gradcheck_float64(gated, bias, transposed, act):
    g = torch.Generator().manual_seed(0)
    n, inter, out, r = 5, 7, 3, 2

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    gate, up = t(2, n, inter), (t(2, n, inter) if gated else None)
    weight = t(*((inter, out) if transposed else (out, inter)), grad=False)
    b, A, B = (t(out) if bias else None), t(r, inter), t(out, r)
    module = nn.SiLU() if act == "silu" else nn.GELU(approximate="tanh")

    def fn(gate, up, b, A, B):
        return gated_mlp.lora_mlp_down(gate, up, module, weight, b, A, B, 0.7, transposed, act == "silu")

    inputs = (gate, up, b, A, B)
    assert torch.autograd.gradcheck(fn, inputs)
    h = module(gate) if up is None else module(gate) * up
    expected = F.linear(h, weight.t() if transposed else weight, b) + 0.7 * h @ A.t() @ B.t()
    torch.testing.assert_close(fn(*inputs), expected, rtol=1e-12, atol=1e-12)


def test_op_with_only_B_trainable_matches_autograd():
    """Frozen A, inputs that need no gradient: only dB (the op then runs as one node)."""
    g = torch.Generator().manual_seed(0)
    gate, up, weight = (torch.randn(*s, generator=g, dtype=torch.float64) for s in ((4, 6), (4, 6), (3, 6)))
    A = torch.randn(2, 6, generator=g, dtype=torch.float64)
    B = torch.randn(3, 2, generator=g, dtype=torch.float64, requires_grad=True)
    y = gated_mlp.lora_mlp_down(gate, up, nn.SiLU(), weight, None, A, B, 0.5, silu=True)
    y.square().sum().backward()
    B_ref = B.detach().clone().requires_grad_(True)
    h = F.silu(gate) * up
    (F.linear(h, weight) + 0.5 * h @ A.t() @ B_ref.t()).square().sum().backward()
    torch.testing.assert_close(B.grad, B_ref.grad, rtol=1e-12, atol=1e-12)


def saved_bytes(model, ids) -> int:
    return activation_memory.saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss)


def test_lora_step_saves_less_than_the_frozen_floor(monkeypatch):
    ids = torch.randint(0, 100, (2, 64), generator=torch.Generator().manual_seed(0))
    floor_model = tiny_llama(torch.bfloat16)
    floor_model.requires_grad_(False)
    floor_model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    floor = saved_bytes(floor_model, ids)
    fused = with_lora(tiny_llama(torch.bfloat16), LLAMA_TARGETS)
    unfused = copy.deepcopy(fused)
    blocks.unfuse(unfused)
    monkeypatch.setattr(blocks, "SHARED_QKV", True)
    monkeypatch.setattr(widen, "PAD_TO", 64)
    lora_shared = saved_bytes(fused, ids)
    # the second pass: the norms write into the widened inputs (blocks.WideNorm), which saves the same bytes
    assert saved_bytes(fused, ids) == lora_shared
    monkeypatch.setattr(blocks, "SHARED_INPUT", False)
    monkeypatch.setattr(blocks, "WIDE_NORM", False)  # else one pass of norms still widened for the ops turned off
    lora_fused, lora_unfused = saved_bytes(fused, ids), saved_bytes(unfused, ids)
    tokens, hidden, inter, layers = 2 * 64, 64, 160, 2
    # unfused, LoRA adds per layer the inputs of q/k/v and gate/up (norm outputs) and of down: (2 h + i) x tokens
    # bf16: at least the down input and act(gate) (exactly that on torch 2.13; 256 bytes a layer more on 2.11)
    assert lora_unfused - lora_fused >= layers * tokens * 2 * inter * 2
    assert lora_fused < floor < lora_unfused
    # the shared-input ops save [X | XA ... | padding] instead of X and each XA: only the padding more
    # (PAD_TO 64, to 128 columns: q/k/v 64 + 3 x 4, gate/up 64 + 2 x 4), and each group's stacked
    # [A_1; ...; A_n] (q/k/v 12 x 64, gate/up 8 x 64), which backward reuses instead of stacking it again
    padding = layers * tokens * ((128 - 76) + (128 - 72)) * 2
    stacked = layers * (12 + 8) * hidden * 2
    assert abs(lora_shared - lora_fused - padding - stacked) <= 256 * layers
    peft = pytest.importorskip("peft")
    theirs = peft.get_peft_model(tiny_llama(torch.bfloat16), peft.LoraConfig(r=4, target_modules=LLAMA_TARGETS),
                                 autocast_adapter_dtype=False)
    assert saved_bytes(theirs, ids) >= lora_unfused  # PEFT stores the down inputs too (and its own extras)


def test_sync_follows_the_adapters(monkeypatch):
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    mlps = [layer.mlp for layer in model.model.layers]
    assert all(isinstance(m.__dict__.get("forward"), blocks.FusedMlpForward) for m in mlps)
    keys = set(tiny_llama().state_dict())
    assert {k.replace(".base_layer", "") for k in model.state_dict() if "lora_" not in k} == keys
    calls = count_fused_calls(monkeypatch)
    ids = torch.randint(0, 100, (2, 12))
    with lk.disable_adapters(model):
        model(input_ids=ids)
    assert calls == []  # disabled adapters: the class's forward
    lk.merge(model)
    model(input_ids=ids)
    assert calls == []  # merged
    lk.unmerge(model)
    step(model)
    assert len(calls) == 2
    lk.delete_adapter(model, "default")
    assert all("forward" not in m.__dict__ for m in mlps)
    with_lora(model, ["q_proj"])  # no LoRA on down: nothing to fuse
    assert blocks.sync(model) == 0
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["down_proj"]), name="second")
    assert blocks.sync(model) == 2
    lk.unload(model, merge_adapters=False)
    assert all("forward" not in m.__dict__ for m in mlps)


def test_dropout_and_reference_flag_fall_back(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    model = with_lora(tiny_llama(), LLAMA_TARGETS, dropout=0.1)
    step(model)
    assert calls == []  # dropout on down: the mask must be applied as the reference does
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    for _, layer in lk.lora_layers(model):
        layer.use_fused_kernel = False
    step(model)
    assert calls == []


def test_hooks_on_the_down_projection_are_honoured(monkeypatch):
    calls = count_fused_calls(monkeypatch)
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    seen = []
    model.model.layers[0].mlp.down_proj.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    step(model)
    assert len(seen) == 1 and len(calls) == 1  # layer 0 unfused (its hook ran), layer 1 fused


def test_takes_over_and_gives_back_an_equivalent_library_forward(monkeypatch):
    """liger-kernel's SwiGLU MLP (bound per instance by lorakit.fast.speed_up_base) computes the same block:
    the fused block takes over from it in either order and restores it. Its Triton op needs a GPU, so a
    stand-in class of the same module path and name computes silu(gate) * up here."""
    import sys
    import types

    class LigerSwiGLUMLP(nn.Module):
        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    fake = types.ModuleType("liger_kernel.transformers.swiglu")
    fake.LigerSwiGLUMLP = LigerSwiGLUMLP
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.swiglu", fake)

    def patch_like_liger(model):
        for layer in model.model.layers:
            layer.mlp.__dict__["forward"] = LigerSwiGLUMLP.forward.__get__(layer.mlp, type(layer.mlp))

    calls = count_fused_calls(monkeypatch)
    model = tiny_llama()
    patch_like_liger(model)  # liger first, then inject
    with_lora(model, LLAMA_TARGETS)
    assert blocks.sync(model) == 2
    loss_first, _ = step(model)
    assert len(calls) == 2
    blocks.unfuse(model)
    assert all(layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward for layer in model.model.layers)
    loss_liger, _ = step(model)
    assert torch.equal(loss_first, loss_liger) and len(calls) == 2
    patch_like_liger(model)  # inject first, then liger (what speed_up_base does after lk.inject)
    assert blocks.sync(model) == 2
    lk.unload(model, merge_adapters=False)
    assert all(layer.mlp.forward.__func__ is LigerSwiGLUMLP.forward for layer in model.model.layers)
    other = tiny_llama()
    other.model.layers[0].mlp.forward = lambda x: x  # an unknown replacement: left alone
    with_lora(other, LLAMA_TARGETS)
    assert blocks.sync(other) == 1


def test_known_after_liger_replaces_the_class_in_transformers(monkeypatch):
    """liger-kernel's speed_up_base also sets ``modeling_llama.LlamaMLP = LigerSwiGLUMLP`` at module level. The
    MLPs built before keep their class: they are still known blocks, however cold the registry's cache (this
    missed them, and lorakit's step on the liger floor ran every MLP per layer). An MLP built after the swap is
    liger's own class (no ``act_fn``): not taken for a LlamaMLP, and nothing fails."""
    import sys
    import types

    from transformers.models.llama import modeling_llama

    class LigerSwiGLUMLP(nn.Module):
        def __init__(self, config):
            super().__init__()
            size, inner = config.hidden_size, config.intermediate_size
            self.gate_proj = nn.Linear(size, inner, bias=False)
            self.up_proj = nn.Linear(size, inner, bias=False)
            self.down_proj = nn.Linear(inner, size, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    LigerSwiGLUMLP.__module__ = "liger_kernel.transformers.swiglu"
    fake = types.ModuleType("liger_kernel.transformers.swiglu")
    fake.LigerSwiGLUMLP = LigerSwiGLUMLP
    monkeypatch.setitem(sys.modules, "liger_kernel.transformers.swiglu", fake)
    model = tiny_llama()
    monkeypatch.setattr(modeling_llama, "LlamaMLP", LigerSwiGLUMLP)
    monkeypatch.setattr(registry, "_MLP_BLOCKS", {})  # a cold cache: nothing looked up before the swap
    for layer in model.model.layers:  # what _patch_swiglu_module binds on each existing MLP
        layer.mlp.__dict__["forward"] = LigerSwiGLUMLP.forward.__get__(layer.mlp, type(layer.mlp))
    calls = count_fused_calls(monkeypatch)
    with_lora(model, LLAMA_TARGETS)
    assert blocks.sync(model) == 2
    model, reference = fused_and_unfused(model)  # the reference runs liger's forward per layer
    loss, grads = step(model)
    assert len(calls) == 2
    loss_reference, grads_reference = step(reference)
    assert len(calls) == 2
    assert torch.allclose(loss, loss_reference, rtol=1e-6, atol=1e-6)
    assert grads.keys() == grads_reference.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_reference[name], rtol=1e-5, atol=1e-6)

    built_after = modeling_llama.LlamaMLP(model.config)  # liger's class now
    assert registry.mlp_block(built_after) is None
    holder = nn.Sequential(built_after)
    lk.inject(holder, lk.LoraConfig(r=4, target_modules=["down_proj"]))
    assert blocks.sync(holder) == 0


def test_compile_adds_no_graph_break():
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    ids = torch.randint(0, 100, (2, 12))
    unfused = copy.deepcopy(model)
    blocks.unfuse(unfused)
    torch._dynamo.reset()
    fused_breaks = torch._dynamo.explain(model)(input_ids=ids, labels=ids).graph_break_count
    torch._dynamo.reset()
    unfused_breaks = torch._dynamo.explain(unfused)(input_ids=ids, labels=ids).graph_break_count
    assert fused_breaks == unfused_breaks
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")
    loss_c, grads_c = step(compiled)
    loss_e, grads_e = step(model)
    torch.testing.assert_close(loss_c, loss_e)
    for name in grads_e:
        torch.testing.assert_close(grads_c[name.replace("_orig_mod.", "")] if name in grads_c else
                                   grads_c["_orig_mod." + name], grads_e[name], rtol=1e-5, atol=1e-6)


def test_a_kernel_that_fails_to_launch_falls_back_once(monkeypatch):
    class Broken:
        def silu_forward(self, *args):
            raise RuntimeError("no such GPU")

    monkeypatch.setattr(gated_mlp, "_triton", Broken())
    monkeypatch.setattr(gated_mlp, "_triton_loaded", True)
    with pytest.warns(UserWarning, match="SiLU kernel failed"):
        assert gated_mlp._launch("silu_forward", torch.zeros(2)) is None
    assert gated_mlp._kernels() is None  # the torch path from then on

    class OutOfMemory:
        def silu_forward(self, *args):
            raise torch.OutOfMemoryError("out of memory")

    monkeypatch.setattr(gated_mlp, "_triton", OutOfMemory())
    with pytest.raises(torch.OutOfMemoryError):
        gated_mlp._launch("silu_forward", torch.zeros(2))


# ---- projections of one input as one op (gate/up, q/k/v), through their widened weights


@pytest.fixture
def qkv(monkeypatch):
    """q/k/v groups on (the default; set here so the tests stay on whatever the default becomes)."""
    monkeypatch.setattr(blocks, "SHARED_QKV", True)


def widened_weights(model):
    return [getattr(parent, name).base_layer.weight for layer in model.model.layers
            for parent, name in ((layer.mlp, "gate_proj"), (layer.mlp, "up_proj"), (layer.self_attn, "q_proj"),
                                 (layer.self_attn, "k_proj"), (layer.self_attn, "v_proj"))]


@pytest.mark.parametrize("pad_to,strided", [(1, False), (64, False), (1, True)])
@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_shared_input_ops_match_the_per_layer_path(dtype, rtol, pad_to, strided, monkeypatch, qkv):
    """Loss and every gradient as the unfused path, up to the order of the sums (the rank-r term is summed
    inside the base GEMM); projections of one group with different ranks (rank_pattern); dX handed on as a
    strided slice of the widened gradient too (shared_input.STRIDED_GRAD_X)."""
    monkeypatch.setattr(widen, "PAD_TO", pad_to)
    monkeypatch.setattr(shared_input, "STRIDED_GRAD_X", strided)
    model = with_lora(tiny_llama(dtype), LLAMA_TARGETS, rank_pattern={"gate_proj": 2, "up_proj": 6, "k_proj": 3})
    fused, unfused = fused_and_unfused(model)
    calls = count_fused_calls(monkeypatch, ["shared"])
    loss_f, grads_f = step(fused)
    assert len(calls) == 4  # per layer: q/k/v and gate/up
    loss_u, grads_u = step(unfused)
    torch.testing.assert_close(loss_f, loss_u, rtol=rtol, atol=0)
    assert grads_f.keys() == grads_u.keys() and any("gate_proj.lora_A" in k for k in grads_f)
    for name in grads_f:
        scale = grads_u[name].abs().max()
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=0, atol=rtol * scale, msg=name)


@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_shared_input_op_gradcheck_float64(bias, strided, monkeypatch):
    monkeypatch.setattr(shared_input, "STRIDED_GRAD_X", strided)
    g = torch.Generator().manual_seed(0)
    n, k, outs, ranks, scales = 5, 4, (6, 3, 3), (2, 3, 1), (0.5, 1.5, 2.0)

    def t(*shape, grad=True):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x = t(2, n, k)
    Ws = [t(o, k, grad=False) for o in outs]
    params = []
    for o, r in zip(outs, ranks):
        params += [t(r, k), t(o, r), t(o) if bias else None]

    def fn(x, *params):
        projections = []
        for i, (W, r, s) in enumerate(zip(Ws, ranks, scales)):
            A, B, b = params[3 * i:3 * i + 3]
            cols = [W] + [s * B.detach() if j == i else torch.zeros(W.shape[0], rj, dtype=W.dtype)
                          for j, rj in enumerate(ranks)] + [torch.zeros(W.shape[0], 3, dtype=W.dtype)]  # padding
            projections.append((A, B, b, s, torch.cat(cols, 1)))
        return shared_input.lora_shared_input(x, projections)

    inputs = (x, *params)
    assert torch.autograd.gradcheck(fn, inputs)
    for i, y in enumerate(fn(*inputs)):
        A, B, b = params[3 * i:3 * i + 3]
        expected = F.linear(x, Ws[i], b) + scales[i] * x @ A.t() @ B.t()
        torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    y0, _, y2 = fn(*inputs)  # an output that never reaches the loss: no gradient from it
    (y0.sum() + y2.square().sum()).backward()
    for p in params[3:5]:
        assert p.grad is None or not p.grad.any()
    assert params[0].grad.abs().sum() > 0


def test_widened_weights_share_the_frozen_weights_storage_and_come_back_intact(qkv):
    model = with_lora(tiny_llama(), LLAMA_TARGETS, rank_pattern={"gate_proj": 8})  # gate/up: 64 + 8 + 4
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    step(model)
    for w in widened_weights(model):  # the weight is a view of its widened buffer: no second copy of W
        width = 64 + 12  # q/k/v: 3 x 4; gate/up: 8 + 4
        assert w.stride() == (width, 1) and not w.is_contiguous()
        assert w.untyped_storage().nbytes() == w.shape[0] * width * w.element_size()
    now = {n: p.detach() for n, p in model.named_parameters() if "lora_" not in n}
    assert all(torch.equal(before[n], now[n]) for n in before)  # values unchanged; state_dict reads them
    lk.merge(model)
    lk.unmerge(model)  # in place through the views
    torch.testing.assert_close(widened_weights(model)[0], before["model.layers.0.mlp.gate_proj.base_layer.weight"],
                               rtol=0, atol=1e-6)
    lk.unload(model, merge_adapters=False)
    for layer in model.model.layers:
        assert layer.mlp.gate_proj.weight.is_contiguous() and layer.mlp.up_proj.weight.is_contiguous()
    assert torch.allclose(model.model.layers[1].mlp.up_proj.weight,
                          before["model.layers.1.mlp.up_proj.base_layer.weight"], rtol=0, atol=1e-6)


def test_shared_input_ops_follow_adapter_switches_and_moves(monkeypatch, qkv):
    """Another active adapter (other ranks: the buffer is widened again), a dtype move (.to: weights
    contiguous again, widened again on the next call), a second forward before backward (no version error)."""
    model = with_lora(tiny_llama(torch.float64), LLAMA_TARGETS)
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=LLAMA_TARGETS), name="other")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    calls = count_fused_calls(monkeypatch, ["shared"])
    for name in ("default", "other", "default"):
        lk.set_active_adapters(model, name)
        for n, p in model.named_parameters():  # train whichever is active
            p.requires_grad_("lora_" in n)
        fused, unfused = fused_and_unfused(model)
        torch.testing.assert_close(step(fused)[0], step(unfused)[0], rtol=1e-12, atol=0)
    assert len(calls) == 12
    model.to(torch.float32)
    fused, unfused = fused_and_unfused(model)
    torch.testing.assert_close(step(fused)[0], step(unfused)[0], rtol=1e-5, atol=0)
    ids = torch.randint(0, 100, (2, 12))
    (model(input_ids=ids, labels=ids).loss + model(input_ids=ids, labels=ids).loss).backward()


def test_shared_input_ops_leave_hooked_or_autocast_cases_to_the_layers(monkeypatch, qkv):
    calls = count_fused_calls(monkeypatch, ["shared"])
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    seen = []
    model.model.layers[0].mlp.gate_proj.register_forward_hook(lambda m, i, o: seen.append(1))
    step(model)
    assert seen == [1] and len(calls) == 3  # layer 0: gate's hook ran (gate, up as layers); q/k/v and layer 1 fused
    calls.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):  # fp32 weights, bf16 compute: per-layer casts
        step(model)
    assert calls == []


@pytest.mark.parametrize("model_type", [entry[0] for entry in _registered(registry._HF_SHARED_INPUT)])
def test_every_registered_family_trains_the_same_with_the_shared_input_ops(model_type, monkeypatch, qkv):
    """A tiny model of each registered family (q/k/v groups and gate/up; Qwen2's q/k/v have biases):
    float64 loss and every gradient as the per-layer path."""
    config = transformers.AutoConfig.for_model(model_type, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                               vocab_size=100, max_position_embeddings=64, pad_token_id=0,
                                               bos_token_id=1, eos_token_id=2)
    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).double()
    with_lora(model, LLAMA_TARGETS)
    calls = count_fused_calls(monkeypatch, ["shared"])
    fused, unfused = fused_and_unfused(model)
    loss_f, grads_f = step(fused)
    assert len(calls) == 4
    loss_u, grads_u = step(unfused)
    torch.testing.assert_close(loss_f, loss_u, rtol=1e-12, atol=0)
    for name in grads_u:
        torch.testing.assert_close(grads_f[name], grads_u[name], rtol=0, atol=1e-12 * grads_u[name].abs().max(),
                                   msg=name)


@pytest.mark.parametrize("with_qkv", [True, False])
def test_qkv_groups_follow_the_switch(with_qkv, monkeypatch):
    """On (the default) q/k/v run as one shared-input op per layer; off, through their own layers."""
    if not with_qkv:
        monkeypatch.setattr(blocks, "SHARED_QKV", False)
    calls = count_fused_calls(monkeypatch, ["shared"])
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    assert isinstance(model.model.layers[0].self_attn.q_proj.__dict__.get("forward"), blocks._Member)
    step(model)
    assert len(calls) == (4 if with_qkv else 2)  # gate/up of both layers, and q/k/v of both when on
    assert model.model.layers[0].self_attn.q_proj.base_layer.weight.is_contiguous() == (not with_qkv)


@pytest.mark.parametrize("with_qkv", [False, True])
def test_weights_are_widened_by_training_only(with_qkv, monkeypatch):
    """An eval or inference pass first (no_grad / inference_mode) runs the per-layer ops and leaves the weights
    contiguous (with dropout a model trains per layer, and would keep strided weights after an eval); after a
    training step has widened them, inference uses the shared op too, and no weight becomes an inference
    tensor."""
    monkeypatch.setattr(blocks, "SHARED_QKV", with_qkv)
    calls = count_fused_calls(monkeypatch, ["shared"])
    model = with_lora(tiny_llama(torch.float64), LLAMA_TARGETS)
    fused, unfused = fused_and_unfused(model)
    ids = torch.randint(0, 100, (2, 12))
    with torch.inference_mode():
        out = fused(input_ids=ids).logits
    with torch.no_grad():
        fused(input_ids=ids)
    assert calls == [] and all(w.is_contiguous() for w in widened_weights(fused))
    torch.testing.assert_close(step(fused)[0], step(unfused)[0], rtol=1e-12, atol=0)
    per_step = 4 if with_qkv else 2
    assert len(calls) == per_step and not widened_weights(fused)[0].is_contiguous()
    with torch.inference_mode():
        torch.testing.assert_close(fused(input_ids=ids).logits, out, rtol=1e-12, atol=1e-12)
    assert len(calls) == 2 * per_step
    assert not any(p.is_inference() for p in fused.parameters())
    torch.testing.assert_close(step(fused)[0], step(unfused)[0], rtol=1e-12, atol=0)


# ---- norms writing into the shared-input ops' widened inputs (blocks.WideNorm)


def norm_buffers(monkeypatch):
    """The buffers the shared-input ops were handed by the norms before them (None where they made a copy)."""
    taken = []

    def spy(widened, x, _orig=blocks._norm_buffer):
        buffer = _orig(widened, x)
        taken.append(buffer)
        return buffer

    monkeypatch.setattr(blocks, "_norm_buffer", spy)
    return taken


def step_as_without_wide_norm(model, plain, seed, monkeypatch):
    """One step of ``model`` and of its copy ``plain`` with WIDE_NORM off: the same loss and gradients, bit for
    bit. Returns the model's."""
    loss, grads = step(model, seed)
    monkeypatch.setattr(blocks, "WIDE_NORM", False)
    loss_p, grads_p = step(plain, seed)
    monkeypatch.setattr(blocks, "WIDE_NORM", True)
    assert torch.equal(loss, loss_p) and grads.keys() == grads_p.keys() and grads
    assert all(torch.equal(grads[k], grads_p[k]) for k in grads_p)
    return loss, grads


@pytest.mark.parametrize("pad_to", [1, 64])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_norms_write_into_the_widened_inputs(dtype, pad_to, monkeypatch, qkv):
    """Each registered RMSNorm before q/k/v and gate/up carries a WideNorm; from the second step on (once the op
    has said how wide its input is) the op takes the norm's buffer instead of copying X, and loss and every
    gradient are the same bits as with WIDE_NORM off (and as the first step's copy: XA is one GEMM over the same
    strided X either way), and the per-layer path's within its tolerance."""
    monkeypatch.setattr(widen, "PAD_TO", pad_to)
    model = with_lora(tiny_llama(dtype), LLAMA_TARGETS, rank_pattern={"gate_proj": 2, "k_proj": 3})
    layer = model.model.layers[0]
    for norm in (layer.input_layernorm, layer.post_attention_layernorm):
        assert isinstance(norm.__dict__.get("forward"), blocks.WideNorm)
    assert not isinstance(model.model.norm.__dict__.get("forward"), blocks.WideNorm)  # read by the head
    plain, unfused = copy.deepcopy(model), copy.deepcopy(model)
    blocks.unfuse(unfused)
    taken = norm_buffers(monkeypatch)
    rtol = 1e-12 if dtype == torch.float64 else 1e-5
    for seed in (1, 2, 3):
        loss, grads = step_as_without_wide_norm(model, plain, seed, monkeypatch)
        loss_u, grads_u = step(unfused, seed)
        torch.testing.assert_close(loss, loss_u, rtol=rtol, atol=0)
        for name, grad in grads_u.items():
            torch.testing.assert_close(grads[name], grad, rtol=0, atol=rtol * grad.abs().max(), msg=name)
    # per step: the model's 4 ops (2 layers, q/k/v and gate/up), then the model with WIDE_NORM off
    assert [b is not None for b in taken] == [False] * 8 + ([True] * 4 + [False] * 4) * 2


def test_a_wide_norm_output_reads_right_and_an_in_place_write_fails_loudly(monkeypatch, qkv):
    """Another reader of the norm's output after the op sees the norm's values (the op writes only beyond
    them); writing into it before backward is refused rather than changing the op's saved input."""
    model = with_lora(tiny_llama(torch.float64), LLAMA_TARGETS)
    step(model)  # the ops say how wide their inputs are
    layer = model.model.layers[0]
    x = torch.randn(2, 12, 64, dtype=torch.float64, requires_grad=True)
    taken = norm_buffers(monkeypatch)
    h = layer.input_layernorm(x)
    expected = type(layer.input_layernorm).forward(layer.input_layernorm, x).detach()
    q = layer.self_attn.q_proj(h)
    assert taken[0] is not None and taken[0].shape[-1] > 64
    torch.testing.assert_close(h.detach() * 1.0, expected, rtol=0, atol=0)
    (q.sum() + h.sum()).backward()  # h read again: fine
    h = layer.input_layernorm(x)
    q = layer.self_attn.q_proj(h)
    with torch.no_grad():
        h.mul_(2)
    with pytest.raises(RuntimeError, match="inplace"):  # autograd's view check or the version check
        q.sum().backward()
    h = layer.input_layernorm(x)
    with pytest.raises(RuntimeError, match="view"):
        h.mul_(2)


def test_wide_norms_follow_the_blocks(monkeypatch, qkv):
    """WideNorms come and go with the groups they feed (unfuse, unload, a norm with another library's forward);
    eval and inference passes after training give the per-layer path's outputs."""
    model = with_lora(tiny_llama(torch.float64), LLAMA_TARGETS)
    layer = model.model.layers[0]
    reference = copy.deepcopy(model)
    blocks.unfuse(reference)
    assert "forward" not in reference.model.layers[0].input_layernorm.__dict__
    step(model)
    ids = torch.randint(0, 100, (2, 12))
    taken = norm_buffers(monkeypatch)
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            torch.testing.assert_close(model(input_ids=ids).logits, reference(input_ids=ids).logits,
                                       rtol=1e-12, atol=1e-12)
    assert any(b is not None for b in taken)
    other = lambda x, _n=layer.post_attention_layernorm: type(_n).forward(_n, x)
    layer.post_attention_layernorm.forward = other
    blocks.sync(model)
    assert layer.post_attention_layernorm.__dict__["forward"] is other  # left alone
    assert isinstance(layer.input_layernorm.__dict__["forward"], blocks.WideNorm)
    lk.unload(model)
    assert "forward" not in layer.input_layernorm.__dict__


def test_every_registered_rms_norm_computes_llamas_forward():
    """registry.is_rms_norm's classes: their forward's source is LlamaRMSNorm's (WideNorm redoes those ops)."""
    import inspect
    reference = inspect.getsource(transformers.models.llama.modeling_llama.LlamaRMSNorm.forward)
    for model_type, (cls_name, _) in registry._HF_RMS_NORMS.items():
        module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
        assert inspect.getsource(getattr(module, cls_name).forward) == reference, cls_name


@pytest.mark.parametrize("reentrant", [False, True])
def test_wide_norms_under_gradient_checkpointing(reentrant, monkeypatch, qkv):
    """Checkpointed layers (lorakit's checkpoint_kwargs and reentrant checkpointing): the recomputation's norms
    write into the ops' inputs as well, and every step gives the bits of WIDE_NORM off."""
    model = with_lora(tiny_llama(), LLAMA_TARGETS)
    kwargs = {"use_reentrant": True} if reentrant else lk.checkpoint_kwargs()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    plain = copy.deepcopy(model)
    taken = norm_buffers(monkeypatch)
    for seed in (1, 2):
        step_as_without_wide_norm(model, plain, seed, monkeypatch)
    assert sum(b is not None for b in taken) >= 8  # the second step: forward and recomputation, 2 layers x 2 ops


@pytest.mark.parametrize("extra", [1, 20])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64])
def test_rms_norm_into_wide_gives_the_class_bits(dtype, extra):
    """kernels.rms_norm against LlamaRMSNorm's own forward through autograd: output, input gradient and (a trained
    weight) weight gradient bit for bit, for a strided output gradient too; the output is the first columns of
    a buffer ``extra`` wider."""
    from lorakit.kernels.rms_norm import rms_norm_into_wide

    norm = transformers.models.llama.modeling_llama.LlamaRMSNorm(48, eps=1e-5).to(dtype)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
    x = torch.randn(3, 7, 48, generator=g).to(dtype).requires_grad_()
    for grad in (torch.randn(3, 7, 48, generator=g).to(dtype), torch.randn(3, 7, 80, generator=g).to(dtype)[..., :48]):
        out = rms_norm_into_wide(x, norm.weight, norm.variance_epsilon, extra)
        buffer = out._base
        assert buffer.shape[-1] == 48 + extra and out.data_ptr() == buffer.data_ptr()
        out.backward(grad)
        mine = out.detach().clone(), x.grad, norm.weight.grad
        x.grad = norm.weight.grad = None
        ref = type(norm).forward(norm, x)
        ref.backward(grad)
        for a, b in zip(mine, (ref.detach(), x.grad, norm.weight.grad)):
            assert torch.equal(a, b)
        x.grad = norm.weight.grad = None


def test_wide_norms_in_bf16_give_the_same_bits(monkeypatch, qkv):
    """bf16: three steps, loss and gradients bit-equal to WIDE_NORM off."""
    model = with_lora(tiny_llama(torch.bfloat16), LLAMA_TARGETS)
    plain = copy.deepcopy(model)
    taken = norm_buffers(monkeypatch)
    for seed in (1, 2, 3):
        step_as_without_wide_norm(model, plain, seed, monkeypatch)
    assert sum(b is not None for b in taken) == 8


def test_a_trained_model_pickles_whole_and_trains_on_the_same(tmp_path, qkv):
    """torch.save of the whole model after training steps (widened weights, wide norms: their weak references are
    not pickled) loads back and computes the next step as the original does."""
    model = with_lora(tiny_llama(torch.float64), LLAMA_TARGETS)
    step(model, 1)
    step(model, 2)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    loss, grads = step(model, 3)
    loss_l, grads_l = step(loaded, 3)
    torch.testing.assert_close(loss_l, loss, rtol=1e-12, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_l[name], grad, rtol=0, atol=1e-12 * grad.abs().max(), msg=name)
