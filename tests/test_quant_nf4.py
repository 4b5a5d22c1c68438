"""lorakit.quant.nf4: the pure-torch 4-bit reference (NF4/FP4, packing, double quantization, bnb format).

Golden vectors are derived by hand from the public format facts (code books, high-nibble-first packing,
absmax per block, the 8-bit dynamic map and its mean offset). When bitsandbytes is importable (the GPU
run installs it), the same reference is also compared with it directly.
"""

import json
import math

import pytest
import torch

from lorakit.errors import QuantError
from lorakit.quant import nf4

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- golden vectors
def test_code_books_are_the_published_values():
    nf = nf4.code_book("nf4")
    assert nf.dtype == torch.float32 and nf.shape == (16,)
    assert nf[0] == -1.0 and nf[7] == 0.0 and nf[15] == 1.0
    assert torch.all(nf[1:] > nf[:-1])  # sorted: index order is value order
    assert nf[8].item() == pytest.approx(0.07958029955625534, abs=0) and nf[1].item() == pytest.approx(
        -0.6961928009986877, abs=0)
    fp = nf4.code_book("fp4") * 12  # sign bit 8; 0b001 is the subnormal 0.0625
    assert fp.tolist() == pytest.approx([0, 0.0625, 8, 12, 4, 6, 2, 3, 0, -0.0625, -8, -12, -4, -6, -2, -3])
    assert math.copysign(1.0, fp[8].item()) == -1.0  # code 8 is -0


def test_dynamic_map_golden():
    m = nf4.dynamic_map()
    assert m.shape == (256,) and torch.all(m[1:] >= m[:-1])
    assert m[127] == 0 and m[255] == 1.0
    # decade 10**0 holds the 64 midpoints of linspace(0.1, 1, 65): the extremes are +-0.99296875
    assert m[0].item() == pytest.approx(-0.99296875, rel=1e-6) and m[254].item() == pytest.approx(0.99296875, rel=1e-6)
    assert m[128].item() == pytest.approx(5.5e-7, rel=1e-5)  # smallest positive: 1e-6 * (0.1 + 1) / 2
    assert m[207].item() == pytest.approx(0.1 + 0.0140625 * 16.5, rel=1e-6)  # see double-quant golden below


def test_packing_golden_high_nibble_first():
    # values chosen as exact code points times absmax 2: codes 0..15 then 15..0, repeated
    idx = torch.tensor(list(range(16)) + list(range(15, -1, -1)) + list(range(16)) + list(range(15, -1, -1)))
    w = nf4.code_book("nf4")[idx] * 2.0
    packed, state = nf4.quantize_4bit(w.reshape(2, 32), blocksize=64, quant_type="nf4", double_quant=False)
    expected = bytes.fromhex("0123456789abcdef" "fedcba9876543210" * 1 + "0123456789abcdef" "fedcba9876543210")
    assert packed.shape == (32, 1) and packed.dtype == torch.uint8
    assert bytes(packed.flatten().tolist()) == expected
    assert state.absmax.tolist() == [2.0]
    assert torch.equal(nf4.dequantize_4bit(packed, state), w.reshape(2, 32))


def test_odd_length_pads_with_the_code_of_zero():
    w = torch.tensor([1.0, -1.0, 0.5])
    p_nf, _ = nf4.quantize_4bit(w, 64, "nf4", False)
    p_fp, _ = nf4.quantize_4bit(w, 64, "fp4", False)
    # nf4: 1.0 -> 15, -1.0 -> 0, 0.5 -> 12 (0.4407 is nearer than 0.5626), pad 0.0 -> 7
    assert p_nf.flatten().tolist() == [0xF0, 0xC7]
    # fp4: 1.0 -> 0b0011, -1.0 -> 0b1011, 0.5 -> 0b0101, pad 0.0 -> 0
    assert p_fp.flatten().tolist() == [0x3B, 0x50]


def test_fp4_sign_and_boundaries_follow_the_kernel():
    absmax = 1.0
    w = torch.tensor([absmax, -0.001, 0.001, 0.0027, 0.58333, 0.5834, -0.2, -0.3])
    packed, _ = nf4.quantize_4bit(w, 64, "fp4", False)
    codes = nf4.unpack_nibbles(packed, w.numel()).tolist()
    # -0.001: sign bit with magnitude 0 (-0); 0.0027 > 0.00260417 -> subnormal; 0.58333 <= 0.583333 -> 1/2;
    # 0.5834 -> 2/3; -0.2 -> -1/6 (0.2 <= 0.20833333); -0.3 -> -1/3 (0.3 > 0.29166667)
    assert codes == [0b0011, 0b1000, 0b0000, 0b0001, 0b0101, 0b0010, 0b1110, 0b1100]


def test_zero_block_gets_code_zero_and_dequantizes_to_zero():
    w = torch.cat([torch.zeros(64), torch.ones(64)])
    packed, state = nf4.quantize_4bit(w, 64, "nf4", False)
    assert packed.flatten()[:32].tolist() == [0] * 32  # bitsandbytes' kernel: 0 * (1/0) = NaN -> code 0
    out = nf4.dequantize_4bit(packed, state)
    assert torch.all(out[:64] == 0) and torch.all(out[64:] == 1)


def test_double_quant_golden():
    # four blocks with absmax 1, 2, 3, 4: offset 2.5, centred -1.5 -0.5 0.5 1.5, absmax2 1.5,
    # scaled -1, -1/3, 1/3, 1 -> nearest dynamic-map entries 0, 47, 207, 255
    w = torch.zeros(4, 64)
    w[:, 0] = torch.tensor([1.0, -2.0, 3.0, -4.0])
    _, state = nf4.quantize_4bit(w, 64, "nf4", True)
    assert state.nested is not None
    assert state.nested.offset.item() == 2.5 and state.nested.absmax.tolist() == [1.5]
    assert state.absmax.dtype == torch.uint8 and state.absmax.tolist() == [0, 47, 207, 255]
    m = nf4.dynamic_map()
    expected = torch.stack([m[i] * 1.5 for i in (0, 47, 207, 255)]) + 2.5
    assert torch.equal(nf4.block_absmax(state), expected)


def test_bnb_serialization_layout():
    w = torch.randn(8, 64, generator=gen())
    _, state = nf4.quantize_4bit(w.to(torch.bfloat16), 64, "nf4", True)
    d = state.as_bnb_dict()
    assert set(d) == {"absmax", "quant_map", "nested_absmax", "nested_quant_map", "quant_state.bitsandbytes__nf4"}
    meta = json.loads(bytes(d["quant_state.bitsandbytes__nf4"].tolist()))
    assert list(meta) == ["quant_type", "blocksize", "dtype", "shape", "nested_blocksize", "nested_dtype",
                          "nested_offset"]
    assert meta["dtype"] == "bfloat16" and meta["shape"] == [8, 64] and meta["nested_blocksize"] == 256
    back = nf4.QuantState.from_bnb_dict(d)
    assert back.shape == (8, 64) and back.dtype == torch.bfloat16
    assert torch.equal(back.nested.offset, state.nested.offset)


def test_matches_bitsandbytes_when_installed():
    """On a GPU: the same packed codes and states as bitsandbytes' CUDA kernel, and the same dequantized bits.

    One known difference: that kernel computes 1/absmax with fast-math's approximate reciprocal, so a value
    whose ratio to its absmax is within an ulp of an FP4 decision boundary may land on the other side. With
    bf16 weights such exact ties (e.g. x / absmax = 5/24, halfway between 1/6 and 1/4) occur in about 1e-4
    of the values; both codes are then equally near. NF4's boundaries are never hit that way.
    """
    F = pytest.importorskip("bitsandbytes.functional")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' CPU path differs from its CUDA kernel (8-bit rounding, FP4 signs); "
                    "the format is the CUDA kernel's")
    bounds = torch.tensor(nf4._FP4_MAGNITUDE_BOUNDS, device="cuda")
    for quant_type in ("nf4", "fp4"):
        for shape, dtype in [((4096, 1024), torch.bfloat16), ((333, 77), torch.float16), ((256, 512), torch.float32)]:
            w = (torch.randn(shape, generator=gen(3)) * 0.02).to(dtype).to("cuda")
            pb, sb = F.quantize_4bit(w, blocksize=64, quant_type=quant_type, compress_statistics=True)
            pl, sl = nf4.quantize_4bit(w, 64, quant_type, True)
            n = w.numel()
            codes_b, codes_l = nf4.unpack_nibbles(pb, n), nf4.unpack_nibbles(pl, n)
            differ = (codes_b != codes_l).nonzero().flatten()
            if quant_type == "nf4":
                assert differ.numel() == 0 and torch.equal(pb, pl), (shape, differ[:5].tolist())
            else:
                flat = w.reshape(-1).float()
                absmax = torch.nn.functional.pad(flat, (0, -n % 64)).view(-1, 64).abs().amax(1)
                ratio = flat[differ] * (1.0 / absmax[differ // 64])
                gap = (ratio.abs()[:, None] - bounds[None, :]).abs().amin(1)
                assert differ.numel() < 1e-3 * n and torch.all(gap <= 2 * torch.finfo(torch.float32).eps), shape
            assert torch.equal(sb.offset, sl.nested.offset), (sb.offset.item(), sl.nested.offset.item())
            assert torch.equal(sb.state2.absmax, sl.nested.absmax), (quant_type, shape)
            assert torch.equal(sb.absmax, sl.absmax), (quant_type, shape)
            # a bitsandbytes state read by lorakit, and a lorakit state read by bitsandbytes: the same bits
            ours_of_bnb = nf4.dequantize_4bit(pb, nf4.QuantState.from_bnb_dict(sb.as_dict(packed=True)))
            assert torch.equal(F.dequantize_4bit(pb, sb), ours_of_bnb), (quant_type, shape)
            bnb_of_ours = F.dequantize_4bit(pl, F.QuantState.from_dict(dict(sl.as_bnb_dict()), device="cuda"))
            assert torch.equal(bnb_of_ours, nf4.dequantize_4bit(pl, sl)), (quant_type, shape)


# ------------------------------------------------------------------------------------------- statistics
def test_nf4_error_on_gaussian_weights_matches_theory():
    w = torch.randn(512, 4096, generator=gen(1))
    p, s = nf4.quantize_4bit(w, 64, "nf4", False)
    err = nf4.quantization_error(w, p, s)
    assert 0.070 < err["mean_abs"] < 0.076  # QLoRA paper / bitsandbytes: about 0.073 at block size 64
    p2, s2 = nf4.quantize_4bit(w, 64, "nf4", True)
    err2 = nf4.quantization_error(w, p2, s2)
    assert torch.equal(p, p2)  # double quantization only touches the absmax values
    assert 0 <= err2["mean_abs"] / err["mean_abs"] - 1 < 0.01  # adds well under 1%
    fp_err = nf4.quantization_error(w, *nf4.quantize_4bit(w, 64, "fp4", False))
    assert fp_err["mean_abs"] > err["mean_abs"]  # NF4 is the better code for normal weights


def test_double_quant_absmax_error_bound():
    w = torch.randn(300, 1000, generator=gen(2)) * torch.linspace(0.1, 3, 1000)
    _, single = nf4.quantize_4bit(w, 64, "nf4", False)
    _, double = nf4.quantize_4bit(w, 64, "nf4", True)
    exact = single.absmax
    approx = nf4.block_absmax(double)
    centred = exact - exact.mean()
    n = centred.numel()
    absmax2 = torch.nn.functional.pad(centred.abs(), (0, -n % 256)).view(-1, 256).amax(1).repeat_interleave(256)[:n]
    # the largest gap of the dynamic map is 0.9 / 64 (its top decade): error <= half of it times absmax2
    bound = 0.5 * 0.9 / 64 * absmax2 + 1e-6 * exact.abs()
    assert torch.all((approx - exact).abs() <= bound)
    assert (approx - exact).abs().max() > 0  # it is an approximation


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("double_quant", [False, True])
def test_dequant_quant_is_idempotent(quant_type, double_quant):
    w = torch.randn(96, 130, generator=gen(4))
    p, s = nf4.quantize_4bit(w, 64, quant_type, double_quant)
    once = nf4.dequantize_4bit(p, s)
    p2, s2 = nf4.quantize_4bit(once, 64, quant_type, double_quant)
    codes, codes2 = nf4.unpack_nibbles(p), nf4.unpack_nibbles(p2)
    if quant_type == "fp4":  # FP4's -0 (code 8) dequantizes to -0.0, which re-quantizes as +0 (code 0)
        codes = torch.where(codes == 8, 0, codes)
    assert torch.equal(codes, codes2)  # the codes are fixed points
    twice = nf4.dequantize_4bit(p2, s2)
    if double_quant:  # the absmax values are re-quantized around a new mean: equal to within that step
        assert torch.allclose(twice, once, rtol=0.01, atol=0)
    else:
        assert torch.equal(twice, once)


@pytest.mark.parametrize("n", [1, 2, 63, 64, 65, 1001])
def test_packing_round_trip(n):
    codes = torch.randint(0, 16, (n,), generator=gen(n), dtype=torch.uint8)
    packed = nf4.pack_nibbles(codes)
    assert packed.shape == ((n + 1) // 2, 1)
    assert torch.equal(nf4.unpack_nibbles(packed, n), codes)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape", [(7, 9), (3, 5, 11), (64, 64), (1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_any_shape_and_dtype_round_trips(device, shape, dtype):
    w = torch.randn(shape, generator=gen(5)).to(dtype).to(device)
    p, s = nf4.quantize_4bit(w, 64, "nf4", True)
    out = nf4.dequantize_4bit(p, s)
    assert out.shape == w.shape and out.dtype == dtype and out.device == w.device
    assert s.absmax.numel() == math.ceil(w.numel() / 64) and p.numel() == (w.numel() + 1) // 2
    scale = float(w.float().abs().max())
    assert (out.float() - w.float()).abs().max() <= 0.16 * scale + 1e-3  # max NF4 gap / 2 of absmax
    assert torch.equal(nf4.dequantize_4bit(p, s.to("cpu") if device == "cpu" else s), out)


@pytest.mark.parametrize("blocksize", [32, 128, 4096])
def test_other_block_sizes(blocksize):
    w = torch.randn(40, 200, generator=gen(6))
    p, s = nf4.quantize_4bit(w, blocksize, "nf4", True)
    assert s.absmax.numel() == math.ceil(8000 / blocksize)
    assert nf4.quantization_error(w, p, s)["rel_fro"] < 0.15


# ------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, match", [
    (torch.arange(6).reshape(2, 3), "floating"),
    (torch.tensor([1.0, float("nan"), 2.0]), "NaN or Inf"),
    (torch.tensor([1.0, float("inf")]), "NaN or Inf"),
    (torch.empty(0, 4), "empty"),
    (torch.empty(4, 4, device="meta"), "meta"),
])
def test_bad_weights_raise(bad, match):
    with pytest.raises(QuantError, match=match):
        nf4.quantize_4bit(bad, where="layers.0.q_proj")


def test_bad_settings_raise():
    w = torch.randn(4, 64)
    with pytest.raises(QuantError, match="unknown quant_type 'int4'"):
        nf4.quantize_4bit(w, quant_type="int4")
    with pytest.raises(QuantError, match="blocksize"):
        nf4.quantize_4bit(w, blocksize=48)


def test_state_of_another_shape_is_rejected():
    p, s = nf4.quantize_4bit(torch.randn(8, 64), 64, "nf4", True)
    other = nf4.QuantState((16, 64), s.dtype, s.blocksize, s.quant_type, s.absmax, s.code, s.nested)
    with pytest.raises(QuantError, match="packed codes hold 512 values"):
        nf4.dequantize_4bit(p, other)
    d = s.as_bnb_dict()
    d["quant_state.bitsandbytes__nf4"] = torch.tensor(list(json.dumps(
        {"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [16, 64], "nested_blocksize": 256,
         "nested_dtype": "float32", "nested_offset": 0.1}).encode()), dtype=torch.uint8)
    with pytest.raises(QuantError, match="absmax should be"):
        nf4.QuantState.from_bnb_dict(d)
    d = s.as_bnb_dict()
    d["quant_map"] = d["quant_map"].flip(0)
    with pytest.raises(QuantError, match="standard nf4 code book"):
        nf4.QuantState.from_bnb_dict(d)
    d = s.as_bnb_dict()
    d["quant_state.bitsandbytes__nf4"] = torch.tensor(list(b"{not json"), dtype=torch.uint8)
    with pytest.raises(QuantError, match="not valid JSON"):
        nf4.QuantState.from_bnb_dict(d)
