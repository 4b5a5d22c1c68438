"""Every LoRA layer family against an independent float64 reference.

Each case builds a base layer, wraps it, and checks: zero init is bit-identical to the base; with random
A and B the output equals ``base(x) + scale * x @ (B @ A)^T`` (or its conv / embedding analogue) computed
independently in float64 from the PEFT-layout tensors; rsLoRA and learnable scales; adapter dtypes
independent of the base dtype; dropout only in train mode; gradients only into A, B (and the scale).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
from torch import nn

import lorakit as lk
from lorakit.config import FusedSpec
from lorakit.layers import AdapterSpec, Conv, Embedding, FusedLinear, Linear, LoraLayer

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D

FP32_TOL = dict(rtol=1e-5, atol=1e-5)  # fp32 layer vs float64 reference (sums of <= 64 products)


@dataclass
class Case:
    base: Callable[[], nn.Module]
    wrap: Callable[[nn.Module], LoraLayer]
    input: Callable[[torch.Generator], torch.Tensor]
    r: int = 4
    dropout_applies: bool = True


def _x(*shape):
    return lambda g: torch.randn(*shape, generator=g)


CASES = {
    "linear": Case(lambda: nn.Linear(12, 10), Linear, _x(5, 12)),
    "linear-3d-input": Case(lambda: nn.Linear(12, 10, bias=False), Linear, _x(2, 3, 12)),
    "conv1d-gpt2": Case(lambda: Conv1D(10, 12), lambda m: Linear(m, fan_in_fan_out=True), _x(2, 3, 12)),
    "fused-equal": Case(
        lambda: nn.Linear(8, 24), lambda m: FusedLinear(m, FusedSpec((True, False, True))), _x(4, 8), r=2
    ),
    "fused-gqa": Case(
        lambda: nn.Linear(8, 32),
        lambda m: FusedLinear(m, FusedSpec((True, True, False), (16, 8, 8))),
        _x(4, 8),
        r=3,
    ),
    "fused-gpt2": Case(
        lambda: Conv1D(24, 8),
        lambda m: FusedLinear(m, FusedSpec((False, True, True)), fan_in_fan_out=True),
        _x(4, 8),
        r=2,
    ),
    "embedding-padding": Case(
        lambda: nn.Embedding(20, 12, padding_idx=0),
        Embedding,
        lambda g: torch.tensor([[0, 3, 19, 0], [5, 5, 1, 2]]),
        dropout_applies=False,
    ),
    "conv1d": Case(lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), Conv, _x(2, 6, 11)),
    "conv2d": Case(lambda: nn.Conv2d(4, 6, 3, padding=1), Conv, _x(2, 4, 7, 7)),
    "conv2d-groups-dilation": Case(
        lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2, groups=2), Conv, _x(2, 4, 9, 8), r=4
    ),
    "conv2d-reflect": Case(
        lambda: nn.Conv2d(3, 5, (3, 1), padding=(1, 0), padding_mode="reflect"), Conv, _x(2, 3, 6, 5)
    ),
    "conv3d-groups": Case(
        lambda: nn.Conv3d(4, 4, (1, 3, 3), stride=(1, 2, 1), padding=(0, 1, 1), groups=2),
        Conv,
        _x(1, 4, 3, 6, 5),
        r=2,
    ),
}
IDS = sorted(CASES)


def build(case: Case, seed: int = 0, **spec) -> tuple[nn.Module, LoraLayer, torch.Tensor]:
    torch.manual_seed(seed)
    base = case.base()
    layer = case.wrap(copy.deepcopy(base))
    layer.add_adapter("a", AdapterSpec(r=case.r, alpha=spec.pop("alpha", 8.0), **spec))
    layer.set_active({"a": 1.0})
    return base, layer, case.input(torch.Generator().manual_seed(seed + 1))


def randomize(layer: LoraLayer, name: str = "a", seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.adapter_parameters(name):
            if p.dim() > 0:  # A and B; a learnable scale keeps its value
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def reference_update(base: nn.Module, layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
    """x @ (B @ A)^T (or the conv / lookup analogue) in float64 from the PEFT-layout tensors, unscaled."""
    state = {k: v.detach().double() for k, v in layer.peft_state(name).items()}
    if isinstance(base, nn.Embedding):
        delta = (state["lora_embedding_B"] @ state["lora_embedding_A"]).T  # (num, dim)
        return delta[x]
    A, B = state["lora_A.weight"], state["lora_B.weight"]
    if isinstance(base, nn.modules.conv._ConvNd):
        G = base.groups
        out, rg, cg = B.shape[0], B.shape[1], base.in_channels // G
        delta = torch.zeros(base.weight.shape, dtype=torch.float64)
        for o in range(out):  # group g's outputs read only group g's rank rows and input channels
            g = o // (out // G)
            a = A[g * rg : (g + 1) * rg, g * cg : (g + 1) * cg]
            delta[o] = torch.einsum("j,j...->...", B[o].reshape(-1), a)
        ref = copy.deepcopy(base).double()
        ref.weight = nn.Parameter(delta)
        ref.bias = None
        return ref(x.double())
    return x.double() @ (B @ A).T


@pytest.mark.parametrize("case", IDS)
def test_zero_init_is_bit_identical_to_base(case):
    base, layer, x = build(CASES[case])
    assert torch.equal(layer(x), base(x))
    assert all(torch.count_nonzero(t) == 0 for k, t in layer.peft_state("a").items() if "B" in k)


@pytest.mark.parametrize("case", IDS)
@pytest.mark.parametrize("rslora", [False, True])
def test_forward_equals_base_plus_scaled_update(case, rslora):
    c = CASES[case]
    base, layer, x = build(c, alpha=6.0, use_rslora=rslora)
    randomize(layer)
    expected_scale = 6.0 / c.r**0.5 if rslora else 6.0 / c.r
    assert layer.scale("a") == pytest.approx(expected_scale, rel=1e-12)
    with torch.no_grad():
        want = base(x).double() + expected_scale * reference_update(base, layer, "a", x)
        got = layer(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, **FP32_TOL)
    assert not torch.allclose(got, base(x), atol=1e-3), "the random adapter must change the output"


@pytest.mark.parametrize("case", ["linear", "conv2d-groups-dilation", "embedding-padding", "fused-gqa"])
def test_learnable_scale_is_used_and_trained(case):
    c = CASES[case]
    base, layer, x = build(c, learnable_scale=True)
    randomize(layer)
    with torch.no_grad():
        layer.lora_scale["a"].fill_(0.37)
        want = base(x).double() + 0.37 * reference_update(base, layer, "a", x)
    out = layer(x)
    torch.testing.assert_close(out.double(), want, **FP32_TOL)
    out.square().sum().backward()
    assert layer.lora_scale["a"].grad is not None and layer.lora_scale["a"].grad.abs() > 0


@pytest.mark.parametrize("case", IDS)
@pytest.mark.parametrize(
    "base_dtype,adapter_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)]
)
def test_adapter_dtype_independent_of_base_keeps_base_output_dtype(case, base_dtype, adapter_dtype):
    c = CASES[case]
    torch.manual_seed(0)
    base = c.base().to(base_dtype)
    layer = c.wrap(copy.deepcopy(base))
    layer.add_adapter("a", AdapterSpec(r=c.r, alpha=8.0, dtype=adapter_dtype))
    layer.set_active({"a": 1.0})
    x = c.input(torch.Generator().manual_seed(1))
    x = x if not x.dtype.is_floating_point else x.to(base_dtype)
    for t in layer.peft_state("a").values():
        assert t.dtype == adapter_dtype
    assert layer.base_weight.dtype == base_dtype
    with torch.no_grad():
        assert torch.equal(layer(x), base(x))  # zero init stays exact across dtypes
        randomize(layer)
        got = layer(x)
        want = base(x).double() + layer.scale("a") * reference_update(base, layer, "a", x)
    assert got.dtype == base_dtype
    # bf16 somewhere in the chain: relative error of a few bf16 ulps (2**-8 each) of the output magnitude
    assert (got.double() - want).abs().max() <= 3e-2 * want.abs().max()


@pytest.mark.parametrize("case", [k for k in IDS if CASES[k].dropout_applies])
def test_dropout_acts_in_train_mode_only(case):
    c = CASES[case]
    base, layer, x = build(c, dropout=0.5)
    randomize(layer)
    with torch.no_grad():
        want = base(x).double() + layer.scale("a") * reference_update(base, layer, "a", x)
        layer.eval()
        torch.testing.assert_close(layer(x).double(), want, **FP32_TOL)
        layer.train()
        torch.manual_seed(0)
        first = layer(x)
        torch.manual_seed(1)
        second = layer(x)
    assert not torch.allclose(first.double(), want, atol=1e-4)
    assert not torch.equal(first, second)


def test_embedding_has_no_dropout_and_padding_row_gets_no_gradient():
    c = CASES["embedding-padding"]
    base, layer, x = build(c, dropout=0.5)
    randomize(layer)
    layer.train()
    with torch.no_grad():
        want = base(x).double() + layer.scale("a") * reference_update(base, layer, "a", x)
    out = layer(x)
    torch.testing.assert_close(out.double(), want, **FP32_TOL)  # ids cannot be dropped: dropout is ignored
    out.sum().backward()
    A = layer.lora_embedding_A["a"]
    assert torch.count_nonzero(A.grad[:, 0]) == 0  # padding_idx=0: no gradient, as the base embedding
    assert torch.count_nonzero(A.grad[:, 3]) > 0


@pytest.mark.parametrize("case", IDS)
@pytest.mark.parametrize("learnable", [False, True])
def test_gradients_reach_only_adapter_parameters(case, learnable):
    c = CASES[case]
    torch.manual_seed(0)
    model = nn.ModuleDict({"layer": c.base()})
    lk.inject(model, lk.LoraConfig(r=c.r, target_modules=["layer"], learnable_scale=learnable))
    layer = model["layer"]
    randomize(layer, "default")
    x = c.input(torch.Generator().manual_seed(1))
    if x.dtype.is_floating_point:
        x.requires_grad_(True)
    layer(x).square().sum().backward()
    adapter = {id(p) for p in layer.adapter_parameters("default")}
    assert len(adapter) == (3 if learnable else 2)
    for name, p in model.named_parameters():
        if id(p) in adapter:
            assert p.requires_grad and p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert not p.requires_grad and p.grad is None, name
    if x.dtype.is_floating_point:
        assert x.grad is not None  # gradients still flow through to the input


def test_fused_disabled_slices_are_untouched():
    c = CASES["fused-gqa"]
    base, layer, x = build(c)
    randomize(layer)
    with torch.no_grad():
        got, plain = layer(x), base(x)
    assert torch.equal(got[:, 24:], plain[:, 24:])  # the disabled third slice (8 outputs)
    assert not torch.allclose(got[:, :24], plain[:, :24], atol=1e-3)
    B = layer.peft_state("a")["lora_B.weight"]  # dense PEFT layout (32, 3 * 2): blocks only
    assert B.shape == (32, 6) and torch.count_nonzero(B[24:]) == 0
    assert torch.count_nonzero(B[:16, 3:]) == 0 and torch.count_nonzero(B[16:24, :3]) == 0


def test_grouped_conv_rank_must_divide_groups():
    conv = nn.Conv2d(4, 6, 3, groups=2)
    layer = Conv(conv)
    with pytest.raises(lk.ConfigError, match="groups=2"):
        layer.add_adapter("a", AdapterSpec(r=3, alpha=3.0))
    assert not layer.specs and not len(layer.lora_A)
