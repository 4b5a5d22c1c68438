"""merge / unmerge / unload / merge_on_eval / combine_adapters on real layer mixes.

Tolerances: merged vs unmerged outputs within 1e-5 of the output magnitude (fp32); unmerge restores fp32
weights within 1e-6 of the weight magnitude and bf16 weights within one bf16 ulp of each element's
magnitude (the merge rounds once, the unmerge once); keep_original restores bit for bit. The fp32 bound
assumes an update no larger than the weight (true of trained adapters): the round trip costs about one
fp32 rounding of |W + delta|, so an update 20x the weight would show ~2e-6.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer, ModulesToSave

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(2, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, groups=2)
        self.c3 = nn.Conv1d(8, 4, 2, dilation=2)
        self.fc = nn.Linear(4 * 7, 5)

    def forward(self, x):
        h = torch.relu(self.c2(torch.relu(self.c1(x))))  # (N, 8, 3, 3)
        return self.fc(self.c3(h.flatten(2)).flatten(1))  # conv1d over the 9 positions -> (N, 4, 7)


def _mlp():
    return nn.Sequential(nn.Embedding(30, 16), nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))


def _gpt2(tmp_path):
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(tmp_path)
    return transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return _gpt2(tmp_path_factory.mktemp("gpt2"))


def make(case: str, gpt2=None, dtype=torch.float32, names=("default",)):
    """(model with random adapters, forward function taking the model)."""
    torch.manual_seed(0)
    if case == "mlp":
        model = _mlp()
        cfg = dict(target_modules=["0", "1", "3"])
        x = torch.randint(0, 30, (4, 5))
        fwd = lambda m: m(x)
    elif case == "conv":
        model = ConvNet()
        cfg = dict(target_modules=[nn.Conv2d, nn.Conv1d, nn.Linear], r=4)
        x = torch.randn(3, 2, 7, 7)
        fwd = lambda m: m(x)
    else:
        model = copy.deepcopy(gpt2)
        cfg = dict(
            target_modules=["c_attn", "c_proj", "c_fc", "wte"], fused_slices={"c_attn": [True, False, True]}
        )
        x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
        fwd = lambda m: m(input_ids=x).logits
    model = model.to(dtype)
    for i, name in enumerate(names):
        lk.inject(model, lk.LoraConfig(**{"r": 2, "alpha": 4.0, **cfg}), name)
        g = torch.Generator().manual_seed(10 + i)
        with torch.no_grad():
            for _, layer in lk.lora_layers(model):
                for p in layer.adapter_parameters(name):
                    p.copy_((torch.randn(p.shape, generator=g) * 0.2).to(p.dtype))
    return model, fwd


def weights(model):
    return {n: layer.base_weight.detach().clone() for n, layer in lk.lora_layers(model)}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CASES = ["mlp", "conv", "gpt2"]


@pytest.mark.parametrize("case", CASES)
def test_merge_equals_unmerged_and_unmerge_restores_fp32(case, gpt2):
    model, fwd = make(case, gpt2)
    w0 = weights(model)
    with torch.no_grad():
        with lk.disable_adapters(model):
            base = fwd(model)
        unmerged = fwd(model)
        done = lk.merge(model)
        assert sorted(done) == sorted(w0)
        assert all(layer.merged == {"default": 1.0} for _, layer in lk.lora_layers(model))
        merged = fwd(model)
        assert rel_err(merged, unmerged) <= 1e-5
        assert rel_err(unmerged, base) > 1e-3  # the adapters matter
        lk.unmerge(model)
        restored = fwd(model)
    for name, w in weights(model).items():
        err = rel_err(w, w0[name])
        assert err <= 1e-6, (name, err)
    assert rel_err(restored, unmerged) <= 1e-5


def _bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    """Spacing of bf16 numbers at |t| (8 significant bits): 2 ** (floor(log2 |t|) - 7); 0 where t == 0."""
    t = t.double().abs()
    return torch.where(
        t > 0, torch.exp2(torch.floor(torch.log2(t.clamp_min(1e-300))) - 7), torch.zeros_like(t)
    )


@pytest.mark.parametrize("case", CASES)
def test_unmerge_restores_bf16_within_one_ulp(case, gpt2):
    model, fwd = make(case, gpt2, dtype=torch.bfloat16)
    w0 = weights(model)
    lk.merge(model)
    wm = weights(model)
    lk.unmerge(model)
    worst = 0.0
    for name, w in weights(model).items():
        assert w.dtype == torch.bfloat16
        allowed = torch.maximum(_bf16_ulp(w0[name]), _bf16_ulp(wm[name]))
        err = (w.double() - w0[name].double()).abs()
        assert torch.all(err <= allowed), (name, (err - allowed).max().item())
        worst = max(worst, err.max().item())
    print(f"bf16 unmerge max abs error ({case}): {worst:.3g}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keep_original_restores_bit_for_bit(dtype, gpt2):
    model, fwd = make("gpt2", gpt2, dtype=dtype)
    w0 = weights(model)
    lk.merge(model, keep_original=True)
    assert any(not torch.equal(w, w0[n]) for n, w in weights(model).items())
    lk.unmerge(model)
    assert all(torch.equal(w, w0[n]) for n, w in weights(model).items())


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("merge_adapters", [True, False])
def test_unload(case, merge_adapters, gpt2):
    model, fwd = make(case, gpt2)
    originals = {n: layer.base_layer for n, layer in lk.lora_layers(model)}
    with torch.no_grad():
        with lk.disable_adapters(model):
            base = fwd(model)
        adapted = fwd(model)
    out = lk.unload(model, merge_adapters=merge_adapters)
    assert out is model
    assert not any(isinstance(m, (LoraLayer, ModulesToSave)) for m in model.modules())
    assert all(model.get_submodule(n) is m for n, m in originals.items())  # the original module objects
    assert not lk.list_adapters(model)
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        got = fwd(model)
    if merge_adapters:
        assert rel_err(got, adapted) <= 1e-5
    else:
        assert torch.equal(got, base)


def test_unload_keeps_the_active_modules_to_save_copy():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randint(0, 30, (4, 5))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["1"], modules_to_save=["3"]))
    with torch.no_grad():
        model[3].modules_to_save["default"].weight.mul_(2.0)
        want = model(x)
        head = model[3].modules_to_save["default"]
    lk.unload(model)
    assert model[3] is head
    assert torch.equal(model(x), want)  # B = 0: the merge adds exact zeros


def test_merge_on_eval_merges_in_eval_and_unmerges_in_train():
    torch.manual_seed(0)
    model = _mlp()
    x = torch.randint(0, 30, (4, 5))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["1", "3"], merge_on_eval=True))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            layer.lora_B["default"].weight.normal_(
                std=0.05
            )  # an update smaller than the weight, as after training
    layers = [layer for _, layer in lk.lora_layers(model)]
    model.train()
    assert not any(layer.merged for layer in layers)
    w0 = weights(model)
    with torch.no_grad():
        train_out = model(x)
    model.eval()
    assert all(layer.merged == {"default": 1.0} for layer in layers)
    assert any(not torch.equal(w, w0[n]) for n, w in weights(model).items())
    with torch.no_grad():
        assert rel_err(model(x), train_out) <= 1e-5
    model.train()
    assert not any(layer.merged for layer in layers)
    assert all(rel_err(w, w0[n]) <= 1e-6 for n, w in weights(model).items())


def test_merged_model_refuses_mixed_batches_and_conflicting_changes(gpt2):
    model, fwd = make("mlp", names=("a", "b"))
    lk.set_active_adapters(model, "a")
    lk.merge(model)
    with pytest.raises(lk.MergeError):
        lk.forward_mixed(model, torch.randint(0, 30, (2, 5)), adapter_names=["a", "b"])
    with pytest.raises(lk.MergeError):
        lk.set_active_adapters(model, "b")
    with pytest.raises(lk.AdapterError, match="merged"):
        lk.delete_adapter(model, "a")
    lk.unmerge(model)
    lk.set_active_adapters(model, "b")  # allowed again


@pytest.mark.parametrize("keep_original", [False, True])
def test_disable_adapters_on_a_merged_model_gives_the_base(keep_original):
    model, fwd = make("mlp")
    with torch.no_grad():
        with lk.disable_adapters(model):
            base = fwd(model)
        lk.merge(model, keep_original=keep_original)
        merged = fwd(model)
        with lk.disable_adapters(model):
            inside = fwd(model)
        after = fwd(model)
    assert torch.equal(inside, base) if keep_original else rel_err(inside, base) <= 1e-5
    assert rel_err(after, merged) <= 1e-5
    assert all(layer.merged for _, layer in lk.lora_layers(model))


@pytest.mark.parametrize("case", ["mlp", "conv-ungrouped"])
def test_weighted_active_set_merges_and_combine_adapters_equals_it(case):
    if case == "mlp":
        model, fwd = make("mlp", names=("a", "b"))
    else:
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Conv2d(6, 4, 1), nn.Flatten(), nn.Linear(4 * 4 * 4, 3)
        )
        x = torch.randn(2, 3, 6, 6)
        fwd = lambda m: m(x)
        for i, name in enumerate(("a", "b")):
            lk.inject(model, lk.LoraConfig(r=2 + i, alpha=3.0, target_modules=[nn.Conv2d, nn.Linear]), name)
            g = torch.Generator().manual_seed(i)
            with torch.no_grad():
                for _, layer in lk.lora_layers(model):
                    for p in layer.adapter_parameters(name):
                        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    weights_ = {"a": 0.7, "b": -0.4}
    with torch.no_grad():
        lk.set_active_adapters(model, weights_)
        weighted = fwd(model)
        lk.merge(model)
        assert rel_err(fwd(model), weighted) <= 1e-5
        lk.unmerge(model)
        lk.combine_adapters(model, weights_, "ab")
        assert "ab" in lk.list_adapters(model)
        lk.set_active_adapters(model, "ab")
        combined = fwd(model)
    assert rel_err(combined, weighted) <= 1e-5
    layer = next(layer for _, layer in lk.lora_layers(model))
    assert layer.specs["ab"].r == layer.specs["a"].r + layer.specs["b"].r


def test_combine_adapters_refuses_block_layouts(gpt2):
    model, _ = make("gpt2", gpt2, names=("a", "b"))
    with pytest.raises(lk.ConfigError, match="c_attn"):
        lk.combine_adapters(model, {"a": 0.5, "b": 0.5}, "ab")
    assert lk.list_adapters(model) == ["a", "b"]


@pytest.mark.parametrize("targets", [["wte"], ["wte", "lm_head"]])
def test_merging_a_tied_embedding_leaves_the_tied_head_alone(targets, gpt2):
    """GPT-2's lm_head shares wte's weight: merging wte's adapter in place would change the head too."""
    model = copy.deepcopy(gpt2)
    shared = model.transformer.wte.weight
    assert model.lm_head.weight is shared
    lk.inject(model, lk.LoraConfig(r=2, target_modules=targets))
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            for p in layer.adapter_parameters("default"):
                p.normal_(std=0.2)
        x = torch.randint(0, 64, (2, 8))
        unmerged = model(input_ids=x).logits
        lk.merge(model)
        assert rel_err(model(input_ids=x).logits, unmerged) <= 1e-5
        lk.unmerge(model)
        assert model.transformer.wte.base_layer.weight is shared  # tied again, to the untouched tensor
        heads = [model.lm_head.base_layer.weight if len(targets) == 2 else model.lm_head.weight]
        assert heads[0] is shared
        assert rel_err(model(input_ids=x).logits, unmerged) <= 1e-6
        lk.unload(model, merge_adapters=True)
        assert rel_err(model(input_ids=x).logits, unmerged) <= 1e-5
