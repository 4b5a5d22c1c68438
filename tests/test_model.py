"""inject on real model shapes: the digits MLP, a torchvision-style conv net, tiny GPT-2 / Llama / BERT.

Summaries against hand counts, every target form, config validation, bias modes, modules_to_save,
several adapters (summed, weighted, deleted, disabled, mixed per row), failure without side effects,
and real training loops that reduce the loss for Linear, Conv2d and Embedding targets.
"""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.layers import LoraLayer, ModulesToSave

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", category=UserWarning)

H = 32  # hidden size of the digits MLP


# ---------------------------------------------------------------------------------- models
class DigitsMLP(nn.Module):
    """The digits tutorial's MLP: an 8x8 image flattened to 64 features, two hidden layers, 10 classes."""

    def __init__(self, hidden: int = H):
        super().__init__()
        self.fc1 = nn.Linear(64, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.head = nn.Linear(hidden, 10)

    def forward(self, x):
        return self.head(F.relu(self.fc2(F.relu(self.fc1(x)))))


class SmallConvNet(nn.Module):
    """torchvision style: ``features`` (conv-bn-relu blocks, one grouped) then a ``classifier``."""

    def __init__(self, batch_norm: bool = True):
        super().__init__()
        norm = nn.BatchNorm2d if batch_norm else (lambda c: nn.Identity())
        self.features = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            norm(8),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, groups=2),
            norm(16),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.classifier = nn.Linear(16 * 2 * 2, 10)

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def _saved_and_loaded(model_cls, config, path):
    torch.manual_seed(0)
    model_cls(config).save_pretrained(path)
    return model_cls.from_pretrained(path).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Tiny GPT-2, Llama (GQA) and BERT classifier, built from configs, saved and loaded back once."""
    root = tmp_path_factory.mktemp("hf")
    return {
        "gpt2": _saved_and_loaded(
            transformers.GPT2LMHeadModel,
            transformers.GPT2Config(
                vocab_size=96, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
            ),
            root / "gpt2",
        ),
        "llama": _saved_and_loaded(
            transformers.LlamaForCausalLM,
            transformers.LlamaConfig(
                vocab_size=96,
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                num_key_value_heads=2,
                max_position_embeddings=64,
            ),
            root / "llama",
        ),
        "bert": _saved_and_loaded(
            transformers.BertForSequenceClassification,
            transformers.BertConfig(
                vocab_size=96,
                hidden_size=32,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=64,
                max_position_embeddings=64,
                num_labels=3,
            ),
            root / "bert",
        ),
    }


def fresh(hf, name):
    return copy.deepcopy(hf[name])


def ids(batch=4, length=10, seed=2):
    return torch.randint(1, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def randomize(model: nn.Module, name: str, seed: int = 1, std: float = 0.1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in lk.lora_layers(model):
            if name in layer.specs:
                for p in layer.adapter_parameters(name):
                    if p.dim() > 0:
                        p.copy_(torch.randn(p.shape, generator=g) * std)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def wrapped(model: nn.Module) -> list[str]:
    return [n for n, _ in lk.lora_layers(model)]


# ---------------------------------------------------------------------------------- summaries
def test_summary_counts_mlp_and_convnet():
    mlp = DigitsMLP()
    base_total = (64 * H + H) + (H * H + H) + (H * 10 + 10)  # hand count of the base
    assert n_params(mlp) == base_total
    info = lk.inject(mlp, lk.LoraConfig(r=4, target_modules=["fc1", "fc2"]))
    lora = 4 * (64 + H) + 4 * (H + H)  # r * (in + out) per Linear
    assert (info.trainable, info.total, info.wrapped) == (lora, base_total + lora, ["fc1", "fc2"])
    assert f"{info.trainable:,}" in str(info)

    net = SmallConvNet()
    base_total = n_params(net)
    info = lk.inject(net, lk.LoraConfig(r=4, target_modules=[nn.Conv2d]))
    conv1 = 4 * 1 * 3 * 3 + 8 * 4  # A (r, in, 3, 3), B (out, r, 1, 1)
    conv2 = 4 * (8 // 2) * 3 * 3 + 16 * (4 // 2)  # groups=2: A (r, in/2, 3, 3), B (out, r/2, 1, 1)
    assert (info.trainable, info.total) == (conv1 + conv2, base_total + conv1 + conv2)
    assert info.wrapped == ["features.0", "features.3"]


def test_summary_counts_hf_models(hf):
    gpt2 = fresh(hf, "gpt2")
    base = n_params(gpt2)  # wte and lm_head are tied: counted once
    info = lk.inject(gpt2, lk.LoraConfig(r=4, target_modules=["c_attn", "wte"]))
    lora = 2 * 4 * (32 + 96) + 4 * (96 + 32)  # two c_attn (32 -> 96), the 96 x 32 embedding
    assert (info.trainable, info.total) == (lora, base + lora)
    assert info.wrapped == ["transformer.wte", "transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]

    llama = fresh(hf, "llama")
    base = n_params(llama)
    info = lk.inject(llama, lk.LoraConfig(r=2, target_modules="all-linear"))
    # q, o: 32 -> 32; k, v: 32 -> 16 (2 kv heads of 8); gate, up: 32 -> 64; down: 64 -> 32
    per_layer = 2 * ((32 + 32) * 2 + (32 + 16) * 2 + (32 + 64) * 2 + (64 + 32))
    assert (info.trainable, info.total) == (2 * per_layer, base + 2 * per_layer)
    assert "lm_head" not in info.wrapped and len(info.wrapped) == 14

    bert = fresh(hf, "bert")
    base = n_params(bert)
    info = lk.inject(
        bert, lk.LoraConfig(r=4, target_modules=["query", "value"], modules_to_save=["classifier"])
    )
    lora, head = 2 * 2 * 4 * (32 + 32), 32 * 3 + 3  # the classifier copy trains in full
    assert (info.trainable, info.total) == (lora + head, base + lora + head)


# ---------------------------------------------------------------------------------- targets
def _llama_paths(kind):
    return [f"model.layers.{i}.{kind}" for i in range(2)]


TARGET_FORMS = {
    "names": (
        dict(target_modules=["q_proj", "v_proj"]),
        _llama_paths("self_attn.q_proj") + _llama_paths("self_attn.v_proj"),
    ),
    "dotted-suffix": (
        dict(target_modules=["mlp.up_proj", "0.self_attn.o_proj"]),
        ["model.layers.0.self_attn.o_proj"] + _llama_paths("mlp.up_proj"),
    ),
    "regex": (
        dict(target_modules=r"model\.layers\.1\.self_attn\.(k|v)_proj"),
        ["model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj"],
    ),
    "types": (dict(target_modules=[nn.Embedding]), ["model.embed_tokens"]),
    "predicate": (
        dict(target_modules=[lambda n, m: isinstance(m, nn.Linear) and m.out_features == 16]),
        _llama_paths("self_attn.k_proj") + _llama_paths("self_attn.v_proj"),
    ),
    "all-linear-exclude": (
        dict(
            target_modules="all-linear",
            exclude_modules=["self_attn.q_proj", "gate_proj", "mlp.up_proj", "down_proj"],
        ),
        [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("k_proj", "v_proj", "o_proj")],
    ),
    "types-with-exclude-regex": (dict(target_modules=[nn.Linear], exclude_modules=r".*(proj)"), ["lm_head"]),
}


@pytest.mark.parametrize("form", sorted(TARGET_FORMS))
def test_target_forms(hf, form):
    kwargs, expected = TARGET_FORMS[form]
    model = fresh(hf, "llama")
    info = lk.inject(model, lk.LoraConfig(r=2, **kwargs))
    assert sorted(info.wrapped) == sorted(expected)
    assert sorted(wrapped(model)) == sorted(expected)


@pytest.mark.parametrize(
    "model_name,head", [("gpt2", "lm_head"), ("llama", "lm_head"), ("bert", "classifier"), ("mlp", "head")]
)
def test_all_linear_skips_the_output_head(hf, model_name, head):
    model = DigitsMLP() if model_name == "mlp" else fresh(hf, model_name)
    linear_like = [
        n
        for n, m in model.named_modules()
        if lk.registry.lookup(m) and lk.registry.lookup(m).kind == "linear"
    ]
    info = lk.inject(model, lk.LoraConfig(r=2, target_modules="all-linear"))
    assert head in linear_like and head not in info.wrapped
    assert sorted(info.wrapped) == sorted(n for n in linear_like if n != head)


def test_pattern_matching_nothing_lists_candidates(hf):
    model = fresh(hf, "gpt2")
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(lk.TargetError) as err:
        lk.inject(model, lk.LoraConfig(target_modules=["q_proj"]))
    msg = str(err.value)
    assert "q_proj" in msg and "transformer.h.0.attn.c_attn (Conv1D)" in msg and "transformer.wte" in msg
    assert not list(lk.lora_layers(model)) and not lk.list_adapters(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(lk.TargetError, match="fc1"):
        lk.inject(DigitsMLP(), lk.LoraConfig(target_modules=r"layer\d+"))


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(r=0), "r"),
        (dict(r=1.5), "r"),
        (dict(r=True), "r"),
        (dict(alpha=0), "alpha"),
        (dict(dropout=1.0), "dropout"),
        (dict(dropout=-0.1), "dropout"),
        (dict(target_modules="(unclosed"), "target"),
        (dict(bias="x"), "bias"),
        (dict(init="x"), "init"),
        (dict(target_modules=[]), "target_modules"),
        (dict(target_modules=None), "target_modules"),
        (dict(rank_pattern={"fc1": 0}), "rank_pattern"),
        (dict(alpha_pattern={"[": 2.0}), "alpha_pattern"),
        (dict(target_modules=[3]), "target_modules"),
        (dict(dtype=torch.int8), "dtype"),
        (dict(fused_slices={"c_attn": [False, False]}), "FusedSpec"),
    ],
)
def test_config_validation(kwargs, field):
    args = dict(target_modules=["fc1"])
    args.update(kwargs)
    with pytest.raises(lk.ConfigError, match=re.escape(field)):
        lk.LoraConfig(**args)


def test_rank_and_alpha_patterns(hf):
    model = fresh(hf, "llama")
    cfg = lk.LoraConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={r"layers\.1\.self_attn\.q_proj": 2},
        alpha_pattern={"v_proj": 3.0},
    )
    lk.inject(model, cfg)
    specs = {n: layer.specs["default"] for n, layer in lk.lora_layers(model)}
    assert specs["model.layers.0.self_attn.q_proj"].r == 4 and specs["model.layers.1.self_attn.q_proj"].r == 2
    assert specs["model.layers.1.self_attn.q_proj"].scale == pytest.approx(8 / 2)
    assert specs["model.layers.0.self_attn.v_proj"].scale == pytest.approx(3.0 / 4)
    layer = model.get_submodule("model.layers.1.self_attn.q_proj")
    assert tuple(layer.lora_A["default"].weight.shape) == (2, 32)


# ---------------------------------------------------------------------------------- trainability
def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes(bias):
    model = DigitsMLP()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1"], bias=bias))
    adapter = {"fc1.lora_A.default.weight", "fc1.lora_B.default.weight"}
    biases = {
        "none": set(),
        "all": {"fc1.base_layer.bias", "fc2.bias", "head.bias"},
        "lora_only": {"fc1.base_layer.bias"},
    }[bias]
    assert _trainable(model) == adapter | biases
    loss = model(torch.randn(3, 64)).sum()
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in adapter | biases), n


def test_modules_to_save_trains_a_head_copy_per_adapter(hf):
    model = fresh(hf, "bert")
    original = model.classifier
    w0 = original.weight.detach().clone()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "b")
    head = model.classifier
    assert isinstance(head, ModulesToSave) and head.original_module is original
    assert set(head.modules_to_save) == {"a", "b"}
    assert head.modules_to_save["a"] is not head.modules_to_save["b"]
    lk.set_active_adapters(model, "a")
    lk.mark_trainable(model, "a")
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    x, y = ids(), torch.tensor([0, 1, 2, 0])
    model.train()
    for _ in range(3):
        loss = F.cross_entropy(model(input_ids=x).logits, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(head.modules_to_save["a"].weight, w0)  # a's copy trained
    assert torch.equal(head.modules_to_save["b"].weight, w0) and torch.equal(original.weight, w0)
    model.eval()
    with torch.no_grad():
        out_a = model(input_ids=x).logits
        lk.set_active_adapters(model, "b")
        out_b = model(input_ids=x).logits
        with lk.disable_adapters(model):
            out_base = model(input_ids=x).logits
    assert torch.equal(out_b, out_base)  # b untrained: B = 0 and its head copy equals the original
    assert not torch.allclose(out_a, out_b, atol=1e-4)


# ---------------------------------------------------------------------------------- several adapters
def _mlp_with_adapters(names=("a", "b", "c"), targets=("head",)):
    torch.manual_seed(0)
    model = DigitsMLP()
    for i, name in enumerate(names):
        lk.inject(model, lk.LoraConfig(r=2 + i, alpha=4.0 + i, target_modules=list(targets)), name)
        randomize(model, name, seed=10 + i)
    return model


def test_active_set_one_several_weighted_is_the_weighted_sum_of_deltas():
    model = _mlp_with_adapters()
    x = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    assert lk.active_adapters(model) == {"a": 1.0}  # the first adapter is active, later ones are not
    with torch.no_grad():
        with lk.disable_adapters(model):
            base = model(x).double()
        single = {}
        for name in "abc":
            lk.set_active_adapters(model, name)
            single[name] = model(x).double() - base
        lk.set_active_adapters(model, ["a", "c"])
        summed = model(x).double() - base
        lk.set_active_adapters(model, {"a": 0.7, "b": -0.2, "c": 1.5})
        weighted = model(x).double() - base
    # only the head is adapted, so the output is linear in its weight: deltas add up exactly (fp32 rounding)
    torch.testing.assert_close(summed, single["a"] + single["c"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        weighted, 0.7 * single["a"] - 0.2 * single["b"] + 1.5 * single["c"], rtol=1e-5, atol=1e-5
    )
    assert lk.active_adapters(model) == {"a": 0.7, "b": -0.2, "c": 1.5}
    with pytest.raises(lk.AdapterError, match="nope"):
        lk.set_active_adapters(model, ["a", "nope"])


def test_delete_adapter_reverts_layers_left_without_adapters():
    model = DigitsMLP()
    fc1, fc2, head = model.fc1, model.fc2, model.head
    x = torch.randn(3, 64)
    want = model(x)
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc1", "fc2"]), "a")
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["fc2"], modules_to_save=["head"]), "b")
    randomize(model, "a")
    randomize(model, "b")
    lk.delete_adapter(model, "a")
    assert model.fc1 is fc1  # the original module object, not a copy
    assert isinstance(model.fc2, LoraLayer) and set(model.fc2.specs) == {"b"}
    assert lk.list_adapters(model) == ["b"]
    lk.delete_adapter(model, "b")
    assert (model.fc1, model.fc2, model.head) == (fc1, fc2, head)
    assert not list(lk.lora_layers(model)) and not lk.list_adapters(model)
    assert torch.equal(model(x), want)
    with pytest.raises(lk.AdapterError):
        lk.delete_adapter(model, "b")


def test_disable_adapters_equals_base_and_restores(hf):
    model = fresh(hf, "gpt2")
    x = ids()
    with torch.no_grad():
        want = model(input_ids=x).logits
        lk.inject(model, lk.LoraConfig(r=4, target_modules=["c_attn", "c_fc", "wte"]))
        randomize(model, "default")
        adapted = model(input_ids=x).logits
        with lk.disable_adapters(model):
            assert torch.equal(model(input_ids=x).logits, want)
        assert torch.equal(model(input_ids=x).logits, adapted)
    assert not torch.allclose(adapted, want, atol=1e-3)


def test_forward_mixed_equals_per_row_runs(hf):
    model = fresh(hf, "bert")
    for name, seed in (("a", 1), ("b", 2)):
        lk.inject(
            model,
            lk.LoraConfig(r=2, target_modules=["query", "value", "dense"], modules_to_save=["classifier"]),
            name,
        )
        randomize(model, name, seed=seed)
        with torch.no_grad():
            model.classifier.modules_to_save[name].weight.add_(0.3 * seed)  # heads differ per adapter
    x = ids(batch=5)
    rows = ["a", None, "b", "a", None]
    with torch.no_grad():
        mixed = lk.forward_mixed(model, input_ids=x, adapter_names=rows).logits
        expected = []
        for i, name in enumerate(rows):
            if name is None:
                with lk.disable_adapters(model):
                    expected.append(model(input_ids=x[i : i + 1]).logits)
            else:
                lk.set_active_adapters(model, name)
                expected.append(model(input_ids=x[i : i + 1]).logits)
    expected = torch.cat(expected)
    torch.testing.assert_close(mixed, expected, rtol=1e-5, atol=1e-5)  # batched vs single-row matmuls
    assert not torch.allclose(expected[0], expected[1], atol=1e-3)
    assert not torch.allclose(expected[0], expected[2], atol=1e-3)
    with pytest.raises(lk.AdapterError, match="rows"):
        lk.forward_mixed(model, input_ids=x, adapter_names=["a", "b"])
    with pytest.raises(lk.AdapterError, match="zzz"):
        lk.forward_mixed(model, input_ids=x, adapter_names=["zzz"] * 5)


def test_inject_failure_leaves_the_model_unchanged():
    net = SmallConvNet()
    lk.inject(net, lk.LoraConfig(r=2, target_modules=["features.0"]), "a")
    modules = dict(net.named_modules())
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {n: p.requires_grad for n, p in net.named_parameters()}
    # features.0 accepts r=3, features.3 (groups=2) does not: the first must be rolled back too
    with pytest.raises(lk.ConfigError, match="groups=2"):
        lk.inject(net, lk.LoraConfig(r=3, target_modules=[nn.Conv2d]), "b")
    assert dict(net.named_modules()) == modules
    assert set(net.features[0].specs) == {"a"} and lk.list_adapters(net) == ["a"]
    assert {k: v for k, v in net.state_dict().items()}.keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
    assert {n: p.requires_grad for n, p in net.named_parameters()} == grads
    with pytest.raises(lk.AdapterError, match="already"):
        lk.inject(net, lk.LoraConfig(r=2, target_modules=["features.0"]), "a")


# ---------------------------------------------------------------------------------- training
def _digits():
    from sklearn.datasets import load_digits

    d = load_digits()  # 1,797 real 8x8 handwritten digits, bundled with scikit-learn
    x = torch.tensor(d.data, dtype=torch.float32) / 16.0
    return x, torch.tensor(d.target, dtype=torch.long)


def _train(model, batches, steps, lr):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    model.train()
    for step in range(steps):
        x, y = batches(step)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _eval_loss(model, x, y):
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


@pytest.mark.parametrize("kind", ["linear", "conv2d"])
def test_training_reduces_loss_on_real_digits(kind, one_thread_test):
    torch.manual_seed(0)
    x, y = _digits()
    if kind == "linear":
        model, targets, lr = DigitsMLP(), ["fc1", "fc2", "head"], 2e-2
    else:  # LoRA on the convs only; without batch norm, which would re-normalise away much of their update
        model, targets, lr = SmallConvNet(batch_norm=False), [nn.Conv2d], 3e-2
        x = x.reshape(-1, 1, 8, 8)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=targets))
    train_x, train_y, test_x, test_y = x[:1400], y[:1400], x[1400:], y[1400:]
    before = _eval_loss(model, test_x, test_y)
    g = torch.Generator().manual_seed(0)

    def batches(step):
        idx = torch.randint(0, len(train_x), (32,), generator=g)
        return train_x[idx], train_y[idx]

    _train(model, batches, steps=100, lr=lr)
    after = _eval_loss(model, test_x, test_y)  # held-out digits
    assert after < 0.7 * before, (before, after)
    for n, p in model.named_parameters():  # the base never moved
        if "lora_" not in n:
            assert torch.equal(p, frozen[n.replace(".base_layer", "")]), n


class BagOfTokens(nn.Module):
    def __init__(self, vocab=50, dim=16, classes=4):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.out = nn.Linear(dim, classes)

    def forward(self, tokens):
        return self.out(self.embed(tokens).mean(dim=1))


def test_training_reduces_loss_with_an_embedding_target(one_thread_test):
    torch.manual_seed(0)
    model = BagOfTokens()
    g = torch.Generator().manual_seed(0)
    label_of_token = torch.randint(0, 4, (50,), generator=g)  # the label is the class of the first token

    def batches(step):
        tokens = torch.randint(1, 50, (64, 2), generator=g)
        return tokens, label_of_token[tokens[:, 0]]

    lk.inject(model, lk.LoraConfig(r=8, alpha=16, target_modules=["embed"]))
    assert _trainable(model) == {"embed.lora_embedding_A.default", "embed.lora_embedding_B.default"}
    test_x, test_y = batches(0)
    before = _eval_loss(model, test_x, test_y)
    _train(model, batches, steps=100, lr=5e-2)
    after = _eval_loss(model, test_x, test_y)
    assert after < 0.7 * before, (before, after)
