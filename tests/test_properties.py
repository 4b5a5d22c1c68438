"""Property tests (hypothesis) over layer families, shapes, ranks and dtypes.

For any drawn layer: zero init equals the base bit for bit; merged equals unmerged; unmerge restores the
weight; disabling equals the base bit for bit; a mixed-adapter batch equals per-row runs. Tolerances:
fp32 outputs 1e-5 of the output magnitude, fp32 weights 1e-6 of the weight magnitude; bf16 outputs 3e-2 of
the output magnitude (a few bf16 roundings of 2**-8 each), bf16 weights one bf16 ulp per element.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import lorakit as lk

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FAMILIES = ["linear", "conv1d-gpt2", "fused", "embedding", "conv1d", "conv2d"]


@dataclass
class Drawn:
    model: nn.Module
    x: torch.Tensor
    dtype: torch.dtype
    r: int
    config: dict

    def forward(self):
        return self.model["layer"](self.x)


@st.composite
def layers(draw):
    family = draw(st.sampled_from(FAMILIES))
    dtype = draw(st.sampled_from([torch.float32, torch.bfloat16]))
    seed = draw(st.integers(0, 2**16))
    batch = draw(st.integers(1, 4))
    r = draw(st.integers(1, 6))
    config = {"alpha": draw(st.sampled_from([1.0, 4.0, 16.0])), "use_rslora": draw(st.booleans())}
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fin, fout = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    if family == "linear":
        base, x = nn.Linear(fin, fout, bias=draw(st.booleans())), torch.randn(batch, 3, fin, generator=g)
    elif family == "conv1d-gpt2":
        base, x = Conv1D(fout, fin), torch.randn(batch, 2, fin, generator=g)
    elif family == "fused":
        sizes = tuple(draw(st.lists(st.integers(1, 6), min_size=2, max_size=3)))
        enabled = tuple(draw(st.lists(st.booleans(), min_size=len(sizes), max_size=len(sizes))))
        enabled = enabled if any(enabled) else (True,) + enabled[1:]
        base, x = nn.Linear(fin, sum(sizes)), torch.randn(batch, fin, generator=g)
        config["fused_slices"] = {"layer": lk.FusedSpec(enabled, sizes)}
    elif family == "embedding":
        num = draw(st.integers(2, 20))
        base = nn.Embedding(num, fout, padding_idx=draw(st.sampled_from([None, 0])))
        x = torch.randint(0, num, (batch, 5), generator=g)
    else:
        groups = draw(st.sampled_from([1, 2]))
        r = groups * draw(st.integers(1, 3))
        cin, cout = groups * draw(st.integers(1, 3)), groups * draw(st.integers(1, 3))
        kernel, stride, padding = draw(st.integers(1, 3)), draw(st.integers(1, 2)), draw(st.integers(0, 1))
        cls, spatial = (nn.Conv1d, (7,)) if family == "conv1d" else (nn.Conv2d, (6, 5))
        base = cls(cin, cout, kernel, stride=stride, padding=padding, groups=groups)
        x = torch.randn(batch, cin, *spatial, generator=g)
    model = nn.ModuleDict({"layer": base}).to(dtype)
    if x.dtype.is_floating_point:
        x = x.to(dtype)
    return Drawn(model, x, dtype, r, config)


def inject(d: Drawn, name: str = "default", seed: int = 0, std: float = 0.1) -> None:
    lk.inject(d.model, lk.LoraConfig(r=d.r, target_modules=["layer"], **d.config), name)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in d.model["layer"].adapter_parameters(name):
            p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * std)


def close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    scale = max(want.double().abs().max().item(), 1e-6)
    return (got.double() - want.double()).abs().max().item() <= tol * scale


def bf16_ulp(t: torch.Tensor) -> torch.Tensor:
    t = t.double().abs()
    return torch.where(
        t > 0, torch.exp2(torch.floor(torch.log2(t.clamp_min(1e-300))) - 7), torch.zeros_like(t)
    )


@SETTINGS
@given(layers())
def test_zero_init_equals_base(d):
    with torch.no_grad():
        want = d.forward()
        lk.inject(d.model, lk.LoraConfig(r=d.r, target_modules=["layer"], **d.config))
        assert torch.equal(d.forward(), want)


@SETTINGS
@given(layers())
def test_disable_equals_base(d):
    with torch.no_grad():
        want = d.forward()
        inject(d)
        adapted = d.forward()
        with lk.disable_adapters(d.model):
            assert torch.equal(d.forward(), want)
        assert torch.equal(d.forward(), adapted)


@SETTINGS
@given(layers(), st.booleans())
def test_merged_equals_unmerged_and_unmerge_restores(d, keep_original):
    inject(d)
    layer = d.model["layer"]
    w0 = layer.base_weight.detach().clone()
    with torch.no_grad():
        unmerged = d.forward()
        lk.merge(d.model, keep_original=keep_original)
        wm = layer.base_weight.detach().clone()
        assert close(d.forward(), unmerged, d.dtype)
        lk.unmerge(d.model)
    w = layer.base_weight
    assert w.dtype == d.dtype
    if keep_original:
        assert torch.equal(w, w0)
    elif d.dtype == torch.float32:
        assert (w - w0).abs().max() <= 1e-6 * max(w0.abs().max().item(), wm.abs().max().item())
    else:
        allowed = torch.maximum(bf16_ulp(w0), bf16_ulp(wm))
        assert torch.all((w.double() - w0.double()).abs() <= allowed)


@SETTINGS
@given(layers(), st.data())
def test_mixed_batch_equals_per_row_runs(d, data):
    inject(d, "a", seed=1)
    inject(d, "b", seed=2)
    names = data.draw(st.lists(st.sampled_from([None, "a", "b"]), min_size=len(d.x), max_size=len(d.x)))
    with torch.no_grad():
        with lk.adapter_per_sample(d.model, names):
            mixed = d.forward()
        rows = []
        for i, name in enumerate(names):
            one = Drawn(d.model, d.x[i : i + 1], d.dtype, d.r, d.config)
            if name is None:
                with lk.disable_adapters(d.model):
                    rows.append(one.forward())
            else:
                lk.set_active_adapters(d.model, name)
                rows.append(one.forward())
    assert close(mixed, torch.cat(rows), d.dtype)
