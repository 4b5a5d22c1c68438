"""Adapter files: bit-exact round trips, PEFT parity in both directions, and every bad input."""

from __future__ import annotations

import copy
import json
import os
import warnings

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LORAKIT_CONFIG

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", category=UserWarning)

TOL = 1e-5  # fp32 parity with PEFT


def _saved_and_loaded(model_cls, config, tmp_path):
    """Build from a config, save, load back: exercises the real loading path."""
    torch.manual_seed(0)
    model_cls(config).save_pretrained(tmp_path / "base")
    return model_cls.from_pretrained(tmp_path / "base").eval()


def gpt2(tmp_path):
    cfg = transformers.GPT2Config(vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=0, eos_token_id=0)
    return _saved_and_loaded(transformers.GPT2LMHeadModel, cfg, tmp_path)


def llama(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return _saved_and_loaded(transformers.LlamaForCausalLM, cfg, tmp_path)


def bert(tmp_path):
    cfg = transformers.BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return _saved_and_loaded(transformers.BertForSequenceClassification, cfg, tmp_path)


def randomize(model: nn.Module, name: str = "default", std: float = 0.05) -> None:
    """Give B (and A) random values so that the adapter changes the output."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            if name in layer.specs:
                for p in layer.adapter_parameters(name):
                    if p.dim() > 0:
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def ids(batch=2, length=12, vocab=96):
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(2))


def logits(model, x):
    with torch.no_grad():
        return model(input_ids=x).logits


CASES = {
    "gpt2": (gpt2, dict(target_modules=["c_attn", "c_proj", "c_fc", "wte"])),
    "gpt2-fused-qv": (gpt2, dict(target_modules=["c_attn"], fused_slices={"c_attn": [True, False, True]})),
    "llama": (llama, dict(target_modules="all-linear", use_rslora=True)),
    "llama-patterns": (llama, dict(target_modules=["q_proj", "v_proj", "embed_tokens"],
                                   rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 4.0})),
    "bert": (bert, dict(target_modules=["query", "value"], modules_to_save=["classifier"])),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_lorakit_file_loads_in_peft_with_same_outputs(case, tmp_path):
    build, kwargs = CASES[case]
    base = build(tmp_path)
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, **kwargs))
    randomize(model)
    if "modules_to_save" in kwargs:
        with torch.no_grad():
            model.classifier.modules_to_save["default"].weight.add_(0.5)
    x = ids()
    ours = logits(model, x)
    assert (ours - logits(base, x)).abs().max() > 1e-3  # the adapter does something
    lk.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "adapter").eval()
    assert (logits(theirs, x) - ours).abs().max().item() < TOL


@pytest.mark.parametrize("case", ["gpt2", "llama", "bert"])
def test_peft_file_loads_in_lorakit_with_same_outputs(case, tmp_path):
    build, _ = CASES[case]
    base = build(tmp_path)
    targets = {"gpt2": ["c_attn", "c_fc"], "llama": ["q_proj", "k_proj", "down_proj"], "bert": ["query", "key"]}
    pcfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=targets[case], init_lora_weights=False,
                           modules_to_save=["classifier"] if case == "bert" else None)
    theirs = peft.get_peft_model(copy.deepcopy(base), pcfg).eval()
    theirs.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    info = lk.load_adapter(ours, tmp_path / "peft")
    assert info.trainable == 0  # loaded for inference
    x = ids()
    assert (logits(ours, x) - logits(theirs, x)).abs().max().item() < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_is_bit_exact(dtype, tmp_path):
    base = llama(tmp_path)
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "embed_tokens"], dtype=dtype,
                                   learnable_scale=True))
    randomize(model)
    for _, layer in lk.lora_layers(model):
        with torch.no_grad():
            layer.lora_scale["default"].mul_(1.37)  # a "learned" scale
    lk.save_adapter(model, tmp_path / "a")
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path / "a", is_trainable=True)
    a, b = lk.adapter_state_dict(model), lk.adapter_state_dict(again)
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype == dtype
        assert torch.equal(a[k], b[k]), k
    for (_, la), (_, lb) in zip(lk.lora_layers(model), lk.lora_layers(again)):
        assert torch.equal(la.lora_scale["default"], lb.lora_scale["default"])
    x = ids()
    assert torch.equal(logits(model, x), logits(again, x))
    assert lk.summary(again).trainable == lk.summary(model).trainable


def test_learned_scale_reaches_peft_through_alpha_pattern(tmp_path):
    base = gpt2(tmp_path)
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["c_attn"], learnable_scale=True))
    randomize(model)
    for _, layer in lk.lora_layers(model):
        with torch.no_grad():
            layer.lora_scale["default"].fill_(0.7)
    lk.save_adapter(model, tmp_path / "a")
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    x = ids()
    assert (logits(theirs, x) - logits(model, x)).abs().max().item() < TOL


def test_grouped_conv_and_two_adapters_round_trip(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, groups=2), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
    base = copy.deepcopy(net)
    lk.inject(net, lk.LoraConfig(r=4, target_modules=[nn.Conv2d]), "one")
    lk.inject(net, lk.LoraConfig(r=2, target_modules=["2"]), "two")
    randomize(net, "one")
    randomize(net, "two")
    lk.set_active_adapters(net, {"one": 0.5, "two": 1.0})
    x = torch.randn(2, 4, 9, 9)
    want = net(x)
    for n in ("one", "two"):
        lk.save_adapter(net, tmp_path / n, name=n)
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path / "one", name="one")
    lk.load_adapter(again, tmp_path / "two", name="two")
    lk.set_active_adapters(again, {"one": 0.5, "two": 1.0})
    assert torch.equal(again(x), want)
    # PEFT reads the grouped conv as an ungrouped A with zero blocks: same outputs
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "one").eval()
    lk.set_active_adapters(again, "one")
    assert (theirs(x) - again(x)).abs().max().item() < TOL


def test_save_writes_peft_layout_and_nothing_pickled(tmp_path):
    model = gpt2(tmp_path)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["c_attn"]))
    out = lk.save_adapter(model, tmp_path / "a", task_type="CAUSAL_LM")
    assert sorted(os.listdir(out)) == sorted([ADAPTER_WEIGHTS, ADAPTER_CONFIG, LORAKIT_CONFIG])
    cfg = json.loads((out / ADAPTER_CONFIG).read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 2 and cfg["task_type"] == "CAUSAL_LM"
    keys = lk.read_adapter(out)[1].keys()
    assert "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight" in keys
    assert len(keys) == 4  # A and B for 2 layers, nothing else


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def saved(tmp_path):
    base = llama(tmp_path)
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    randomize(model)
    lk.save_adapter(model, tmp_path / "a")
    return base, tmp_path / "a"


def _snapshot(model):
    return [(k, v.clone()) for k, v in model.state_dict().items()], [type(m) for m in model.modules()], \
        [p.requires_grad for p in model.parameters()]


def _assert_untouched(model, snap):
    state, types, grads = snap
    now = list(model.state_dict().items())
    assert [k for k, _ in now] == [k for k, _ in state]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(now, state))
    assert [type(m) for m in model.modules()] == types
    assert [p.requires_grad for p in model.parameters()] == grads
    assert lk.list_adapters(model) == []


def test_adapter_for_another_base_names_the_key_and_shapes(saved, tmp_path):
    _, path = saved
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2)
    other = transformers.LlamaForCausalLM(cfg)
    snap = _snapshot(other)
    with pytest.raises(lk.AdapterLoadError, match=r"lora_A\.weight'.*expects shape \(4, 48\).*has \(4, 32\)"):
        lk.load_adapter(other, path)
    _assert_untouched(other, snap)


def test_adapter_whose_targets_do_not_exist(saved):
    _, path = saved
    net = nn.Sequential(nn.Linear(4, 4))
    snap = _snapshot(net)
    with pytest.raises(lk.AdapterLoadError, match="does not fit this model.*matched no adaptable module"):
        lk.load_adapter(net, path)
    _assert_untouched(net, snap)


def test_missing_and_unexpected_keys(saved, tmp_path):
    from safetensors.torch import load_file, save_file

    base, path = saved
    tensors = load_file(path / ADAPTER_WEIGHTS)
    dropped = dict(tensors)
    dropped.pop(sorted(dropped)[0])
    save_file(dropped, path / ADAPTER_WEIGHTS)
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match="is missing from the file"):
        lk.load_adapter(model, path)
    _assert_untouched(model, snap)
    save_file({**tensors, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 32)},
              path / ADAPTER_WEIGHTS)
    with pytest.raises(lk.AdapterLoadError, match="up_proj.lora_A.weight' in the file has no place"):
        lk.load_adapter(model, path)
    _assert_untouched(model, snap)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "pickle-only", "int-dtype", "bad-json",
                                    "prefix", "dora", "prompt-tuning", "no-config", "no-dir"])
def test_damaged_folders_give_clear_errors(saved, damage):
    from safetensors.torch import load_file, save_file

    base, path = saved
    weights = path / ADAPTER_WEIGHTS
    expect = {
        "truncate": "truncated or not a safetensors file", "garbage": "truncated or not a safetensors file",
        "empty": "truncated or not a safetensors file", "pickle-only": "pickle files are never loaded",
        "int-dtype": "must be floating point", "bad-json": "not valid JSON", "prefix": "does not start with",
        "dora": "lora_magnitude_vector' is missing", "prompt-tuning": "PROMPT_TUNING adapter", "no-config": "has neither",
        "no-dir": "does not exist",
    }[damage]
    if damage == "truncate":
        weights.write_bytes(weights.read_bytes()[:-100])
    elif damage == "garbage":
        weights.write_bytes(b"\x80\x04not a safetensors file at all" * 10)
    elif damage == "empty":
        weights.write_bytes(b"")
    elif damage == "pickle-only":
        weights.unlink()
        torch.save({}, path / "adapter_model.bin")
    elif damage == "int-dtype":
        tensors = load_file(weights)
        save_file({k: v.to(torch.int32) for k, v in tensors.items()}, weights)
    elif damage == "bad-json":
        (path / LORAKIT_CONFIG).write_text("{not json")
    elif damage == "prefix":
        save_file({k.removeprefix("base_model.model."): v for k, v in load_file(weights).items()}, weights)
    elif damage in ("dora", "prompt-tuning", "no-config"):
        (path / LORAKIT_CONFIG).unlink()
        cfg = json.loads((path / ADAPTER_CONFIG).read_text())
        if damage == "dora":
            cfg["use_dora"] = True
        if damage == "prompt-tuning":
            cfg["peft_type"] = "PROMPT_TUNING"
        (path / ADAPTER_CONFIG).write_text(json.dumps(cfg))
        if damage == "no-config":
            (path / ADAPTER_CONFIG).unlink()
    elif damage == "no-dir":
        path = path / "nowhere"
    model = copy.deepcopy(base)
    snap = _snapshot(model)
    with pytest.raises(lk.AdapterLoadError, match=expect):
        lk.load_adapter(model, path)
    _assert_untouched(model, snap)


def test_failed_write_keeps_the_previous_file(saved, monkeypatch):
    base, path = saved
    before = (path / ADAPTER_WEIGHTS).read_bytes()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("lorakit.io.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        lk.save_adapter(model, path)
    assert (path / ADAPTER_WEIGHTS).read_bytes() == before
    assert not [p for p in os.listdir(path) if p.endswith(".tmp")]


def test_loading_the_same_name_twice_is_refused(saved):
    base, path = saved
    model = copy.deepcopy(base)
    lk.load_adapter(model, path)
    with pytest.raises(lk.AdapterLoadError, match="already has an adapter named 'default'"):
        lk.load_adapter(model, path)
    lk.load_adapter(model, path, name="second")
    assert lk.list_adapters(model) == ["default", "second"]


@pytest.mark.parametrize("save_with, load_with", [("parametrize", None), ("parametrize", "inject"),
                                                  ("inject", "parametrize")])
def test_parametrized_adapters_use_the_same_files(save_with, load_with, tmp_path):
    base = gpt2(tmp_path)
    model = copy.deepcopy(base)
    config = lk.LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"])
    (lk.parametrize if save_with == "parametrize" else lk.inject)(model, config)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and p.dim() == 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    x = ids()
    want = logits(model, x)
    lk.save_adapter(model, tmp_path / "a")
    assert json.loads((tmp_path / "a" / LORAKIT_CONFIG).read_text())["method"] == save_with
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path / "a", method=load_with)
    assert (logits(again, x) - want).abs().max().item() < TOL
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "a").eval()
    assert (logits(theirs, x) - want).abs().max().item() < TOL
