"""PiSSA: W_res + s B A == W0 at init, the same A, B and residual as PEFT, the randomized SVD option, files in
both directions (the residual re-derived at load, as PEFT does), conversion to a plain LoRA on the original
base, restoring W0 on delete / failed inject / failed load, refusals, DoRA + PiSSA, and training."""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit as lk
from lorakit.io import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from lorakit.layers import Linear4bit
from lorakit.layers.pissa import principal_factors

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
warnings.filterwarnings("ignore", category=UserWarning)

TOL = 1e-5


pytestmark = pytest.mark.usefixtures("one_thread")


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)).eval()


def gpt2():
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=16, n_layer=2, n_head=2)
    return transformers.GPT2LMHeadModel(cfg).eval()


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def train_a_bit(model, lr=0.05):
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * lr)


X = torch.randn(5, 16, generator=torch.Generator().manual_seed(9))


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4"])
def test_residual_plus_adapter_is_w0_and_output_unchanged(init):
    model = mlp()
    w0 = weights(model)
    y0 = model(X)
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=["0", "2"], init=init))
    for path in ("0", "2"):
        layer = model.get_submodule(path)
        restored = layer.base_layer.weight + layer.delta_weight("default")
        torch.testing.assert_close(restored, w0[f"{path}.weight"], rtol=0, atol=TOL)
        assert not torch.allclose(layer.base_layer.weight, w0[f"{path}.weight"])  # the residual is really in
    torch.testing.assert_close(model(X), y0, rtol=0, atol=TOL)


def test_gpt2_conv1d_pissa_matches_peft_init_exactly():
    base = gpt2()
    ours = copy.deepcopy(base)
    lk.inject(ours, lk.LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_fc"], init="pissa"))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"], init_lora_weights="pissa", fan_in_fan_out=True))
    ours_w = dict(ours.named_parameters())
    for name, p in theirs.base_model.model.named_parameters():  # same names: base_layer, lora_A.default, ...
        torch.testing.assert_close(ours_w[name], p, rtol=TOL, atol=TOL, msg=name)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours(input_ids=ids).logits, base(input_ids=ids).logits, rtol=0, atol=1e-4)


def test_randomized_svd_is_seeded_and_close_to_optimal():
    g = torch.Generator().manual_seed(0)
    U, _ = torch.linalg.qr(torch.randn(256, 256, generator=g))
    V, _ = torch.linalg.qr(torch.randn(128, 128, generator=g))
    spectrum = 0.8 ** torch.arange(128, dtype=torch.float32)
    W = U[:, :128] @ torch.diag(spectrum) @ V.T
    r = 8
    optimal = spectrum[r:].square().sum().sqrt()
    A, B = principal_factors(W, r, 2.0, niter=4)
    A2, B2 = principal_factors(W, r, 2.0, niter=4)
    assert torch.equal(A, A2) and torch.equal(B, B2)  # reproducible: a saved adapter can be re-applied
    error = torch.linalg.matrix_norm(W - 2.0 * B @ A)
    assert error < 1.05 * optimal
    Af, Bf = principal_factors(W, r, 2.0, niter=None)
    torch.testing.assert_close(torch.linalg.matrix_norm(W - 2.0 * Bf @ Af), optimal, rtol=1e-4, atol=1e-6)


def test_files_both_directions_with_peft(tmp_path):
    base = mlp()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=["0", "2"], init="pissa"))
    train_a_bit(model)
    trained = model(X)
    lk.save_adapter(model, tmp_path / "lk")
    assert json.loads((tmp_path / "lk" / ADAPTER_CONFIG).read_text())["init_lora_weights"] == "pissa"
    # onto the ORIGINAL base: the residual is taken out again, then the trained A, B act on it
    again = copy.deepcopy(base)
    lk.load_adapter(again, tmp_path / "lk")
    torch.testing.assert_close(again(X), trained, rtol=0, atol=TOL)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lk")
    torch.testing.assert_close(theirs(X), trained, rtol=0, atol=TOL)

    pm = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=3, target_modules=["0", "2"],
                                                                  init_lora_weights="pissa"))
    train_a_bit(pm)
    expected = pm(X)
    pm.save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lk.load_adapter(ours, tmp_path / "peft")
    torch.testing.assert_close(ours(X), expected, rtol=0, atol=TOL)


def test_convert_to_plain_lora_on_the_original_base(tmp_path):
    base = mlp()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=3, alpha=6, target_modules=["0", "2"], init="pissa_niter_2", use_rslora=True,
                                   learnable_scale=True))
    train_a_bit(model)
    with torch.no_grad():
        model[0].lora_scale["default"].mul_(1.5)  # a learned scale differs from the one at init
    trained = model(X)
    lk.save_pissa_as_lora(model, tmp_path)
    cfg = json.loads((tmp_path / ADAPTER_CONFIG).read_text())
    assert cfg["r"] == 6 and cfg["init_lora_weights"] is True and cfg["use_rslora"] is True
    for loader in ("lorakit", "peft"):
        fresh = copy.deepcopy(base)
        if loader == "lorakit":
            lk.load_adapter(fresh, tmp_path)
        else:
            fresh = peft.PeftModel.from_pretrained(fresh, tmp_path)
        torch.testing.assert_close(fresh(X), trained, rtol=0, atol=TOL, msg=loader)
    assert torch.equal(model(X), trained)  # converting leaves the model alone


def test_delete_and_failed_inject_restore_w0():
    model = mlp()
    w0 = weights(model)
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["0", "2"], init="pissa"))
    lk.delete_adapter(model, "default")
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, w0[n], rtol=0, atol=1e-6)

    net = nn.Sequential(nn.Linear(8, 8), nn.Conv1d(2, 2, 3))
    before = weights(net)
    with pytest.raises(lk.ConfigError, match="PiSSA is defined for Linear"):
        lk.inject(net, lk.LoraConfig(r=2, target_modules=["0", "1"], init="pissa"))
    assert type(net[0]) is nn.Linear
    for n, p in net.named_parameters():
        torch.testing.assert_close(p, before[n], rtol=0, atol=1e-6)


def test_failed_load_leaves_the_model_bit_exact(tmp_path):
    base = mlp()
    model = copy.deepcopy(base)
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["0", "2"], init="pissa"))
    lk.save_adapter(model, tmp_path)
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / ADAPTER_WEIGHTS)
    key = next(k for k in tensors if k.endswith("2.lora_B.weight"))
    tensors[key] = torch.zeros(5, 3)
    save_file(tensors, tmp_path / ADAPTER_WEIGHTS)
    target = copy.deepcopy(base)
    w0 = weights(target)
    with pytest.raises(lk.AdapterLoadError, match="expects shape"):
        lk.load_adapter(target, tmp_path)
    for n, p in target.named_parameters():
        assert torch.equal(p, w0[n]), n  # the residual is only taken out after the file was checked


def test_refusals():
    with pytest.raises(lk.ConfigError, match="pissa_niter"):
        lk.LoraConfig(r=2, target_modules=["0"], init="pissa_niter_0")
    fused = nn.Sequential(nn.Linear(8, 24))
    with pytest.raises(lk.ConfigError, match="FusedLinear"):
        lk.inject(fused, lk.LoraConfig(r=2, target_modules=["0"], init="pissa", fused_slices={"0": [True] * 3}))
    q = nn.Sequential(Linear4bit.from_linear(nn.Linear(64, 16)))
    with pytest.raises(lk.ConfigError, match="quantize the residual"):
        lk.inject(q, lk.LoraConfig(r=2, target_modules=["0"], init="pissa"))
    with pytest.raises(lk.ConfigError, match="exceeds"):
        lk.inject(nn.Sequential(nn.Linear(4, 3)), lk.LoraConfig(r=4, target_modules=["0"], init="pissa"))
    model = mlp()
    lk.inject(model, lk.LoraConfig(r=2, target_modules=["0"]))
    with pytest.raises(lk.ConfigError, match="not initialized with PiSSA"):
        lk.save_pissa_as_lora(model, "/nonexistent/never-written")


def test_dora_with_pissa_zero_change_and_peft_parity(tmp_path):
    base = mlp()
    model = copy.deepcopy(base)
    y0 = model(X)
    lk.inject(model, lk.LoraConfig(r=2, alpha=4, target_modules=["0", "2"], init="pissa", use_dora=True))
    torch.testing.assert_close(model(X), y0, rtol=0, atol=TOL)
    train_a_bit(model)
    trained = model(X)
    lk.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(theirs(X), trained, rtol=0, atol=TOL)
    lk.save_pissa_as_lora(model, tmp_path / "plain")
    fresh = copy.deepcopy(base)
    lk.load_adapter(fresh, tmp_path / "plain")
    torch.testing.assert_close(fresh(X), trained, rtol=0, atol=TOL)


def test_training_lowers_the_loss():
    model = mlp()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=["0", "2"], init="pissa"))
    g = torch.Generator().manual_seed(4)
    x, y = torch.randn(32, 16, generator=g), torch.randn(32, 8, generator=g)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(25):
        loss = F.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


def test_unload_keeps_a_merged_pissa_adapter_and_drops_an_unmerged_one():
    model = mlp()
    w0 = weights(model)
    lk.inject(model, lk.LoraConfig(r=3, target_modules=["0", "2"], init="pissa"))
    train_a_bit(model)
    trained = model(X)
    merged = lk.unload(copy.deepcopy(model))
    torch.testing.assert_close(merged(X), trained, rtol=0, atol=TOL)  # W_res + s B A: the fine-tuned weights
    dropped = lk.unload(model, merge_adapters=False)
    for n, p in dropped.named_parameters():
        torch.testing.assert_close(p, w0[n], rtol=0, atol=1e-6)  # the original model
