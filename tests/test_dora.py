"""DoRA: zero change at init, the forward against an independent float64 reference of the definition, merged ==
unmerged, exact unmerge, PEFT parity in both directions (files and outputs, dropout included), mixed batches,
adapters mixing DoRA and plain LoRA, and training."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.layers import Linear4bit
from lorakit.layers.dora import DoraConv, DoraFusedLinear, DoraLayer, DoraLinear

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", category=UserWarning)
from transformers.pytorch_utils import Conv1D

TOL = 1e-5  # fp32


pytestmark = pytest.mark.usefixtures("one_thread")


class Net(nn.Module):
    """One of each family DoRA supports: Linear, GPT-2 Conv1D, Conv1d, Conv2d (padding_mode reflect)."""

    def __init__(self, padding_mode="reflect"):
        super().__init__()
        self.lin = nn.Linear(12, 10)
        self.c1d = Conv1D(10, 12)  # (in=12, out=10), weight stored (12, 10)
        self.conv1 = nn.Conv1d(3, 5, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 6, 3, padding=1, padding_mode=padding_mode)

    def forward(self, x, seq, img):
        return self.lin(x) + self.c1d(x), self.conv1(seq), self.conv2(img)


TARGETS = ["lin", "c1d", "conv1", "conv2"]


def inputs(batch=4):
    g = torch.Generator().manual_seed(7)
    return torch.randn(batch, 12, generator=g), torch.randn(batch, 3, 9, generator=g), torch.randn(
        batch, 3, 5, 5, generator=g)


def net(padding_mode="reflect"):
    torch.manual_seed(0)
    return Net(padding_mode).eval()


def randomize(model, name="default", std=0.3):
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            if name in layer.specs:
                for p in layer.adapter_parameters(name):
                    p.add_(torch.randn(p.shape, generator=g) * std)


def max_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a, b))


def test_zero_change_at_init_and_dora_classes():
    model = net()
    x = inputs()
    before = model(*x)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=TARGETS, use_dora=True))
    assert isinstance(model.lin, DoraLinear) and isinstance(model.conv2, DoraConv)
    assert max_diff(model(*x), before) == 0.0
    # magnitude = row norm of W, in PEFT's shapes
    assert model.lin.lora_magnitude_vector["default"].shape == (10,)
    assert model.c1d.lora_magnitude_vector["default"].shape == (10,)
    assert model.conv2.lora_magnitude_vector["default"].shape == (1, 6, 1, 1)
    torch.testing.assert_close(model.c1d.lora_magnitude_vector["default"], model.c1d.base_layer.weight.norm(dim=0))


def _reference(layer: DoraLayer, x: torch.Tensor, name="default") -> torch.Tensor:
    """Definition of DoRA in float64: y = (m / ||V||_rows) * (V x) + b with V = W + s B A."""
    base = layer.base_layer
    W = base.weight.double()
    state = layer.peft_state(name)  # PEFT layout: a fused projection's B is dense
    A, B = state["lora_A.weight"].detach().double(), state["lora_B.weight"].detach().double()
    s = float(layer.scale(name))
    m = layer.lora_magnitude_vector[name].detach().double().reshape(-1)
    bias = None if base.bias is None else base.bias.double()
    if isinstance(layer, DoraConv):
        V = W + s * (B.flatten(1) @ A.flatten(1)).reshape(W.shape)
        V = V * (m / V.flatten(1).norm(dim=1)).reshape(-1, *(1,) * (W.dim() - 1))
        return base._conv_forward(x.double(), V, bias)
    if layer.fan_in_fan_out:
        W = W.T
    V = W + s * B @ A
    V = V * (m / V.norm(dim=1))[:, None]
    return F.linear(x.double(), V, bias)


def test_forward_matches_float64_definition():
    model = net()
    lk.inject(model, lk.LoraConfig(r=3, alpha=5, target_modules=TARGETS, use_dora=True, use_rslora=True))
    randomize(model)
    x, seq, img = inputs()
    for layer, inp in ((model.lin, x), (model.c1d, x), (model.conv1, seq), (model.conv2, img)):
        torch.testing.assert_close(layer(inp).double(), _reference(layer, inp), rtol=TOL, atol=TOL)


def test_merged_equals_unmerged_and_unmerge_restores():
    model = net()
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=TARGETS, use_dora=True))
    randomize(model)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    x = inputs()
    unmerged = model(*x)
    lk.merge(model)
    assert max_diff(model(*x), unmerged) < TOL
    lk.unmerge(model)
    assert max_diff(model(*x), unmerged) < TOL
    for n, p in model.named_parameters():
        if n in weights:
            torch.testing.assert_close(p, weights[n], rtol=0, atol=1e-6)
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if "base_layer" in n}
    lk.merge(model, keep_original=True)
    lk.unmerge(model)
    for n, p in model.named_parameters():
        if n in weights:
            assert torch.equal(p, weights[n]), n  # bit-exact with keep_original
    merged = lk.unload(copy.deepcopy(model))
    assert max_diff(merged(*x), unmerged) < TOL


def test_weighted_dora_and_plain_adapters_merge_like_they_run():
    model = net()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=TARGETS, use_dora=True), "d1")
    lk.inject(model, lk.LoraConfig(r=3, target_modules=TARGETS, use_dora=True), "d2")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=TARGETS), "plain")
    for name in ("d1", "d2", "plain"):
        randomize(model, name)
    lk.set_active_adapters(model, {"d1": 0.7, "d2": 0.5, "plain": 1.2})
    x = inputs()
    unmerged = model(*x)
    # each DoRA adapter adds weight * ((c - 1) W x + c s B A x), relative to the unmerged W
    lk.merge(model, ["d1"])  # merging one by one re-folds all from the unmerged weight
    lk.merge(model, ["d2", "plain"])
    assert max_diff(model(*x), unmerged) < 5 * TOL
    lk.unmerge(model)
    assert max_diff(model(*x), unmerged) < 5 * TOL


def test_unmerged_dora_beside_merged_adapter_is_refused():
    model = net()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["lin"], use_dora=True), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["lin"], use_dora=True), "b")
    lk.set_active_adapters(model, ["a", "b"])
    model.lin.merge(["a"])
    model.lin.merged.clear()  # simulate a half-merged state that the layer API itself never leaves
    model.lin.merged["a"] = 1.0
    with pytest.raises(lk.MergeError, match="DoRA"):
        model.lin(torch.randn(2, 12))


def test_fused_kernel_is_never_used_for_dora(monkeypatch):
    import lorakit.layers.linear as linear_mod

    def boom(*args, **kwargs):
        raise AssertionError("the fused plain-LoRA kernel ran for a DoRA adapter")

    model = nn.Sequential(nn.Linear(8, 8))
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    assert model[0].plain_matmul and model[0]._fused_adapter(torch.randn(2, 8), (), {}) is None
    monkeypatch.setattr(linear_mod, "lora_linear_fused", boom)
    model(torch.randn(2, 8)).sum().backward()


def test_fused_projection_and_4bit_base():
    torch.manual_seed(0)
    fused = nn.Sequential(nn.Linear(8, 24))
    lk.inject(fused, lk.LoraConfig(r=2, target_modules=["0"], fused_slices={"0": [True, False, True]},
                                   use_dora=True))
    assert isinstance(fused[0], DoraFusedLinear)
    randomize(fused)
    x = torch.randn(3, 8)
    torch.testing.assert_close(fused(x).double(), _reference(fused[0], x), rtol=TOL, atol=TOL)
    y = fused(x)
    lk.merge(fused)
    torch.testing.assert_close(fused(x), y, rtol=TOL, atol=TOL)

    q = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 16), compute_dtype=torch.float32))
    before = q(torch.randn(2, 64))
    lk.inject(q, lk.LoraConfig(r=2, target_modules=["0"], use_dora=True))
    x = torch.randn(2, 64)
    assert torch.equal(q(x), q[0].base_layer(x)) and before.shape == (2, 16)
    randomize(q)
    W = q[0].dense_weight()
    A, B = q[0].lora_A["default"].weight, q[0].lora_B["default"].weight
    V = W + q[0].scale("default") * B @ A
    m = q[0].lora_magnitude_vector["default"]
    ref = F.linear(x, V * (m / V.norm(dim=1))[:, None], q[0].base_layer.bias)
    torch.testing.assert_close(q(x), ref, rtol=1e-4, atol=1e-4)


def test_peft_loads_lorakit_dora_and_lorakit_loads_peft_dora(tmp_path):
    x = inputs()
    model = net("zeros")  # PEFT's LoRA convs always pad with zeros; lorakit's follow the base (exact merges)
    base = copy.deepcopy(model)
    lk.inject(model, lk.LoraConfig(r=2, alpha=6, target_modules=TARGETS, use_dora=True))
    randomize(model)
    ours = model(*x)
    lk.save_adapter(model, tmp_path / "lk")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk")(*x)
    assert max_diff(ours, theirs) < TOL

    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=TARGETS, use_dora=True, init_lora_weights=False)
    pm = peft.get_peft_model(copy.deepcopy(base), cfg)
    with torch.no_grad():  # move the magnitudes away from ||W|| as training would
        for n, p in pm.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1.3)
    expected = pm(*x)
    pm.save_pretrained(tmp_path / "peft")
    loaded = copy.deepcopy(base)
    lk.load_adapter(loaded, tmp_path / "peft")
    assert max_diff(loaded(*x), expected) < TOL
    # merged weights agree too
    peft_merged = pm.merge_and_unload()
    lk.merge(loaded)
    for name in TARGETS:
        torch.testing.assert_close(getattr(loaded, name).base_layer.weight, getattr(peft_merged, name).weight,
                                   rtol=TOL, atol=TOL)


def test_gpt2_dora_parity_with_dropout_in_train_mode(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=1, n_head=2)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(cfg)
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=2, alpha=4, dropout=0.3, target_modules=["c_attn", "c_fc"], use_dora=True))
    randomize(ours, std=0.1)
    lk.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path, is_trainable=True)
    ours.train()
    theirs.train()
    for m in (ours, theirs):  # only the adapters' dropout: same RNG draws in both
        for mod in m.modules():
            if isinstance(mod, nn.Dropout) and mod.p != 0.3:
                mod.p = 0.0
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.manual_seed(11)
    a = ours(input_ids=ids).logits
    torch.manual_seed(11)
    b = theirs(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=TOL, atol=TOL)


def test_mixed_batch_rows_match_single_adapter_runs():
    model = net()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=TARGETS, use_dora=True), "d")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=TARGETS), "p")
    randomize(model, "d")
    randomize(model, "p")
    x = inputs(3)
    mixed = lk.forward_mixed(model, *x, adapter_names=["d", None, "p"])
    for row, name in enumerate(["d", None, "p"]):
        if name is None:
            with lk.disable_adapters(model):
                single = model(*x)
        else:
            lk.set_active_adapters(model, name)
            single = model(*x)
        for got, want in zip(mixed, single):
            torch.testing.assert_close(got[row], want[row], rtol=TOL, atol=TOL)


def test_dora_joins_a_plain_layer_and_leaves_it_alone():
    model = net()
    x = inputs()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=TARGETS), "plain")
    randomize(model, "plain")
    plain_out = model(*x)
    old_layer = model.lin
    lk.inject(model, lk.LoraConfig(r=2, target_modules=TARGETS, use_dora=True), "dora")
    assert isinstance(model.lin, DoraLinear) and model.lin is not old_layer
    assert "dora" not in old_layer.specs and "dora" not in old_layer.lora_A  # the old layer is untouched
    assert max_diff(model(*x), plain_out) == 0.0  # "plain" still active, same result
    lk.set_active_adapters(model, ["plain", "dora"])
    # DoRA at init adds nothing; two active adapters take the reference path, which sums in another order
    # than the fused kernel "plain" alone used for plain_out: equal to fp32 rounding
    assert max_diff(model(*x), plain_out) <= 1e-5
    lk.delete_adapter(model, "dora")
    assert max_diff(model(*x), plain_out) == 0.0


def test_dora_refusals():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4))
    with pytest.raises(lk.ConfigError, match="embedding"):
        lk.inject(model, lk.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    assert type(model[1]) is nn.Linear  # nothing half-done
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["1"], use_dora=True), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["1"], use_dora=True), "b")
    with pytest.raises(lk.ConfigError, match="DoRA"):
        lk.combine_adapters(model, {"a": 1.0, "b": 1.0}, "c")
    with pytest.raises(lk.ConfigError, match="use_dora"):
        lk.LoraConfig(r=2, target_modules=["1"], use_dora="yes")


def test_training_lowers_the_loss_and_trains_the_magnitude():
    model = net()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=TARGETS, use_dora=True))
    x = inputs(16)
    g = torch.Generator().manual_seed(5)
    targets = [torch.randn(o.shape, generator=g) for o in model(*x)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    mag = model.conv2.lora_magnitude_vector["default"]
    assert any(p is mag for p in trainable)
    start = mag.detach().clone()
    opt = torch.optim.Adam(trainable, lr=2e-2)
    losses = []
    for _ in range(30):
        loss = sum(F.mse_loss(o, t) for o, t in zip(model(*x), targets))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert not torch.equal(mag, start)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "base_layer" in n)


def test_bf16_zero_change_and_round_trip(tmp_path):
    """The magnitude is kept in fp32, so c = ||W|| / ||W|| = 1 exactly at init, also for a bf16 model."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16), nn.Conv1d(4, 4, 3)).to(torch.bfloat16)
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0", "1"], use_dora=True))
    x, seq = torch.randn(3, 16, dtype=torch.bfloat16), torch.randn(2, 4, 7, dtype=torch.bfloat16)
    assert torch.equal(model[0](x), base[0](x)) and torch.equal(model[1](seq), base[1](seq))
    assert model[0].lora_magnitude_vector["default"].dtype == torch.float32
    randomize(model, std=0.05)
    lk.save_adapter(model, tmp_path)
    loaded = copy.deepcopy(base)
    lk.load_adapter(loaded, tmp_path)
    assert torch.equal(loaded[0](x), model[0](x)) and torch.equal(loaded[1](seq), model[1](seq))
