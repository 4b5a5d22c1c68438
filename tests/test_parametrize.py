"""The torch.nn.utils.parametrize variant: same maths and tensor layout as the wrapper layers of inject."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize as P

import lorakit as lk
from lorakit._threads import one_thread
from lorakit.parametrize import (
    LoraParametrization,
    mark_parametrized_trainable,
    parametrized_configs,
    parametrized_layers,
)

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)


class Nets(nn.Module):
    """Every family the parametrization handles: Linear, Embedding (padding_idx), Conv1d/2d/3d with groups."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 8, padding_idx=0)
        self.c1 = nn.Conv1d(8, 8, 3, padding=1, groups=2)
        self.c2 = nn.Conv2d(1, 4, 3, stride=2, dilation=1, padding=1)
        self.c3 = nn.Conv3d(1, 2, (1, 2, 2))
        self.fc = nn.Linear(8 + 16 + 12, 5)

    def forward(self, ids, img):
        h = self.c1(self.emb(ids).transpose(1, 2)).mean(-1)  # (N, 8)
        g = self.c2(img).flatten(1)  # (N, 16)
        v = self.c3(img.unsqueeze(1)).mean(2).flatten(1)  # (N, 12)
        return self.fc(torch.cat([h, g, v], dim=1))


def nets_inputs():
    g = torch.Generator().manual_seed(5)
    return torch.randint(0, 20, (3, 6), generator=g), torch.randn(3, 1, 4, 3, generator=g)


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    path = tmp_path_factory.mktemp("gpt2")
    cfg = transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)
    return transformers.GPT2LMHeadModel.from_pretrained(path).eval()


def case(name, gpt2):
    """(fresh model, forward function, LoraConfig kwargs)."""
    torch.manual_seed(0)
    if name == "nets":
        ids, img = nets_inputs()
        return (
            Nets(),
            lambda m: m(ids, img),
            dict(target_modules=[nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear], r=2),
        )
    x = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    kwargs = dict(
        target_modules=["c_attn", "c_fc", "wte"],
        r=4,
        alpha=8,
        use_rslora=True,
        rank_pattern={r"h\.1\.mlp\.c_fc": 2},
    )
    return copy.deepcopy(gpt2), lambda m: m(input_ids=x).logits, kwargs


def randomize_parametrized(model, name="default", seed=0, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, lp in parametrized_layers(model):
            if name in lp.specs:
                for p in lp.adapter_parameters(name):
                    if p.dim() > 0:
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def load_into_wrapper(model, name, state):
    """PEFT-layout tensors into inject's layers, through each layer's own loader."""
    for path, layer in lk.lora_layers(model):
        if name in layer.specs:
            prefix = f"base_model.model.{path}."
            layer.load_peft_state(
                name, {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            )


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


CASES = ["nets", "gpt2"]


@pytest.mark.parametrize("name", CASES)
def test_zero_init_is_bit_identical_and_module_types_stay(name, gpt2):
    model, fwd, kwargs = case(name, gpt2)
    with torch.no_grad():
        want = fwd(model)
    info = lk.parametrize(model, lk.LoraConfig(**kwargs))
    assert info.wrapped and all(
        isinstance(
            model.get_submodule(p),
            (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd, transformers.pytorch_utils.Conv1D),
        )
        for p in info.wrapped
    )
    assert all(P.is_parametrized(model.get_submodule(p), "weight") for p in info.wrapped)
    with torch.no_grad():
        assert torch.equal(fwd(model), want)
    assert not list(lk.lora_layers(model))  # no wrapper layers: the modules keep their classes


@pytest.mark.parametrize("name", CASES)
def test_equals_the_wrapper_variant_given_the_same_tensors(name, gpt2):
    model_p, fwd, kwargs = case(name, gpt2)
    model_w = copy.deepcopy(model_p)
    cfg = lk.LoraConfig(**kwargs)
    info_p = lk.parametrize(model_p, cfg)
    info_w = lk.inject(model_w, cfg)
    assert sorted(info_p.wrapped) == sorted(info_w.wrapped)
    assert info_p.trainable == info_w.trainable  # same tensors, same shapes
    randomize_parametrized(model_p)
    state = lk.parametrized_state_dict(model_p)
    wrapper_state = lk.adapter_state_dict(model_w)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in wrapper_state.items()
    }
    load_into_wrapper(model_w, "default", state)
    back = lk.adapter_state_dict(model_w)
    assert all(torch.equal(back[k], v) for k, v in state.items())
    with torch.no_grad():
        out_p, out_w = fwd(model_p), fwd(model_w)
        with lk.disable_adapters(model_w):
            base = fwd(model_w)
    assert rel_err(out_p, base) > 1e-3
    assert rel_err(out_p, out_w) <= 1e-6


def test_several_adapters_weighted_like_the_wrapper(gpt2):
    model_p, fwd, kwargs = case("nets", gpt2)
    model_w = copy.deepcopy(model_p)
    for i, name in enumerate(("a", "b")):
        cfg = lk.LoraConfig(**{**kwargs, "r": 2 + 2 * i})
        lk.parametrize(model_p, cfg, name)
        lk.inject(model_w, cfg, name)
        randomize_parametrized(model_p, name, seed=i)
        load_into_wrapper(model_w, name, lk.parametrized_state_dict(model_p, name))
    assert lk.parametrized_active(model_p) == {"a": 1.0}  # later adapters start inactive, as with inject
    for active in ({"b": 1.0}, {"a": 0.6, "b": -1.3}):
        lk.set_parametrized_active(model_p, active)
        lk.set_active_adapters(model_w, active)
        with torch.no_grad():
            assert rel_err(fwd(model_p), fwd(model_w)) <= 1e-6
    lk.delete_parametrized_adapter(model_p, "a")
    assert lk.parametrized_active(model_p) == {"b": -1.3}
    lk.delete_parametrized_adapter(model_p, "b")
    assert not list(parametrized_layers(model_p)) and type(model_p.fc) is nn.Linear
    with pytest.raises(lk.AdapterError):
        lk.set_parametrized_active(model_p, "a")


@pytest.mark.parametrize("name", CASES)
def test_enable_disable(name, gpt2):
    model, fwd, kwargs = case(name, gpt2)
    with torch.no_grad():
        base = fwd(model)
    lk.parametrize(model, lk.LoraConfig(**kwargs))
    randomize_parametrized(model)
    with torch.no_grad():
        adapted = fwd(model)
        with lk.disable_parametrized(model):
            assert torch.equal(fwd(model), base)
        assert torch.equal(fwd(model), adapted)
        lk.set_parametrized_enabled(model, False)
        assert torch.equal(fwd(model), base)
        with lk.disable_parametrized(model):
            pass
        assert torch.equal(fwd(model), base)  # the context manager restores the previous state: off
        lk.set_parametrized_enabled(model, True)
        assert torch.equal(fwd(model), adapted)
        with P.cached():
            assert torch.equal(fwd(model), adapted)
    assert rel_err(adapted, base) > 1e-3


@pytest.mark.parametrize("name", CASES)
@pytest.mark.parametrize("merge", [True, False])
def test_remove_parametrizations(name, merge, gpt2):
    model, fwd, kwargs = case(name, gpt2)
    with torch.no_grad():
        base = fwd(model)
    params = {
        n: m.weight for n, m in model.named_modules() if isinstance(getattr(m, "weight", None), nn.Parameter)
    }
    originals = {n: p.detach().clone() for n, p in params.items()}
    info = lk.parametrize(model, lk.LoraConfig(**kwargs))
    randomize_parametrized(model)
    with torch.no_grad():
        adapted = fwd(model)
    assert lk.remove_parametrizations(model, merge=merge) is model
    assert not any(P.is_parametrized(m) for m in model.modules())
    assert not any(isinstance(m, LoraParametrization) for m in model.modules())
    tied = {"transformer.wte"} if merge and name == "gpt2" else set()  # lm_head shares wte's weight
    for n, p in params.items():
        w = model.get_submodule(n).weight
        assert (w is p) == (n not in tied), n  # the same Parameter objects: optimizers stay valid
        changed = not torch.equal(w, originals[n])
        assert changed == (merge and n in info.wrapped), n
    assert all(p.requires_grad for p in model.parameters())
    with torch.no_grad():
        got = fwd(model)
    if merge:
        assert rel_err(got, adapted) <= 1e-6
    else:
        assert torch.equal(got, base)


def test_training_reduces_loss_and_touches_only_the_adapter():
    from sklearn.datasets import load_digits

    torch.manual_seed(0)
    d = load_digits()
    x, y = torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lk.parametrize(model, lk.LoraConfig(r=4, alpha=8, target_modules=[nn.Linear]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{i}.parametrizations.weight.0.lora_{ab}.default" for i in (0, 2) for ab in "AB"}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        before = F.cross_entropy(model(x[1400:]), y[1400:]).item()
    with one_thread():
        for _ in range(100):
            idx = torch.randint(0, 1400, (32,), generator=g)
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = F.cross_entropy(model(x[1400:]), y[1400:]).item()
    assert after < 0.7 * before, (before, after)
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".parametrizations.weight.original", ".weight")]), n


def test_learnable_scale_trains_and_bias_modes():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))
    lk.parametrize(
        model, lk.LoraConfig(r=2, alpha=3, target_modules=["0"], learnable_scale=True, bias="lora_only")
    )
    lp = model[0].parametrizations.weight[0]
    assert lp.lora_scale["default"].item() == pytest.approx(1.5)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "0.bias",
        "0.parametrizations.weight.0.lora_A.default",
        "0.parametrizations.weight.0.lora_B.default",
        "0.parametrizations.weight.0.lora_scale.default",
    }
    randomize_parametrized(model)
    model(torch.randn(4, 6)).square().sum().backward()
    assert lp.lora_scale["default"].grad.abs() > 0
    with torch.no_grad():
        lp.lora_scale["default"].fill_(0.25)
        want = lk.lora_delta(lp.lora_A["default"], lp.lora_B["default"], 0.25)
        assert torch.allclose(model[0].weight - model[0].parametrizations.weight.original, want, atol=1e-7)
    assert lp.peft_rank_alpha("default") == (2, pytest.approx(0.5))
    mark_parametrized_trainable(model, "default", bias="all")
    assert {"0.bias", "2.bias"} <= {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    "base_dtype,adapter_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_adapter_dtype_independent_of_base(base_dtype, adapter_dtype, gpt2):
    model, fwd, kwargs = case("nets", gpt2)
    model = model.to(base_dtype)
    ids, img = nets_inputs()
    with torch.no_grad():
        base = model(ids, img.to(base_dtype))
    lk.parametrize(model, lk.LoraConfig(**kwargs, dtype=adapter_dtype))
    assert all(p.dtype == adapter_dtype for _, _, lp in parametrized_layers(model) for p in lp.parameters())
    with torch.no_grad():
        assert torch.equal(model(ids, img.to(base_dtype)), base)
        randomize_parametrized(model)
        out = model(ids, img.to(base_dtype))
    assert out.dtype == base_dtype and model.fc.weight.dtype == base_dtype
    assert not torch.equal(out, base)


def test_state_round_trip_and_bad_input_changes_nothing(gpt2):
    model, fwd, kwargs = case("nets", gpt2)
    lk.parametrize(model, lk.LoraConfig(**kwargs))
    randomize_parametrized(model)
    state = {k: v.clone() for k, v in lk.parametrized_state_dict(model).items()}
    assert "base_model.model.emb.lora_embedding_A" in state and "base_model.model.fc.lora_B.weight" in state
    assert state["base_model.model.c1.lora_A.weight"].shape == (
        2,
        8,
        3,
    )  # grouped conv A expanded as PEFT stores it
    other, _, _ = case("nets", gpt2)
    lk.parametrize(other, lk.LoraConfig(**kwargs))
    before = {k: v.clone() for k, v in lk.parametrized_state_dict(other).items()}
    bad = dict(state)
    bad["base_model.model.fc.lora_B.weight"] = torch.zeros(5, 3)
    with pytest.raises(lk.AdapterLoadError, match=r"fc\.lora_B\.weight.*\(5, 2\).*\(5, 3\)"):
        lk.load_parametrized_state(other, bad)
    mixed = dict(state)
    mixed["base_model.model.c1.lora_A.weight"] = torch.ones(2, 8, 3)  # mixes channel groups
    with pytest.raises(lk.AdapterLoadError, match="groups"):
        lk.load_parametrized_state(other, mixed)
    with pytest.raises(lk.AdapterLoadError, match="missing"):
        lk.load_parametrized_state(other, {k: v for k, v in state.items() if "emb" not in k})
    with pytest.raises(lk.AdapterLoadError, match="no place"):
        lk.load_parametrized_state(other, {**state, "base_model.model.zz.lora_A.weight": torch.zeros(1)})
    assert all(torch.equal(v, before[k]) for k, v in lk.parametrized_state_dict(other).items())
    lk.load_parametrized_state(other, state)
    assert all(torch.equal(v, state[k]) for k, v in lk.parametrized_state_dict(other).items())
    with torch.no_grad():
        assert torch.equal(fwd(other), fwd(model))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(dropout=0.1), lk.ConfigError, "dropout"),
        (dict(modules_to_save=["fc"]), lk.ConfigError, "modules_to_save"),
        (dict(merge_on_eval=True), lk.ConfigError, "merge_on_eval"),
        (dict(r=3), lk.ConfigError, "groups=2"),  # c1 has groups=2; the modules before it must be rolled back
        (dict(target_modules=["nothing"]), lk.TargetError, "emb"),
    ],
)
def test_errors_leave_the_model_unchanged(kwargs, error, match, gpt2):
    model, fwd, base_kwargs = case("nets", gpt2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(error, match=match):
        lk.parametrize(model, lk.LoraConfig(**{**base_kwargs, **kwargs}))
    assert not any(P.is_parametrized(m) for m in model.modules())
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    assert not parametrized_configs(model)


def test_one_variant_per_module_and_unique_names(gpt2):
    model, _, kwargs = case("nets", gpt2)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc"]))
    with pytest.raises(lk.TargetError, match="inject"):
        lk.parametrize(model, lk.LoraConfig(r=2, target_modules=["fc"]))
    lk.parametrize(model, lk.LoraConfig(r=2, target_modules=["c2"]), "p")
    with pytest.raises(lk.AdapterError, match="p"):
        lk.parametrize(model, lk.LoraConfig(r=2, target_modules=["c2"]), "p")
