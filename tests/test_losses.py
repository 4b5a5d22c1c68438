"""The chunked causal-LM cross-entropy equals the plain fp32 formula, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.train.losses import shifted_cross_entropy_sum


def reference(logits, labels):
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
                           ignore_index=-100, reduction="sum")


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("chunk", [7 * 50, 1 << 26])  # 7 rows per chunk (ragged, across sequences), one chunk
def test_value_and_gradient_match_plain_cross_entropy(dtype, chunk, device):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 19, 50, generator=gen) * 4).to(device, dtype)
    labels = torch.randint(0, 50, (3, 19), generator=gen).to(device)
    labels[0, :5] = -100  # a masked prompt
    labels[2, 11] = -100
    a = logits.clone().requires_grad_(True)
    b = logits.clone().requires_grad_(True)
    mine = shifted_cross_entropy_sum(a, labels, chunk_elements=chunk)
    ref = reference(b, labels)
    scale = torch.tensor(0.37, device=device)  # a non-trivial upstream gradient, as loss * grad_scale / targets gives
    (mine * scale).backward()
    (ref * scale).backward()
    assert mine.dtype == torch.float32
    torch.testing.assert_close(mine, ref.float(), rtol=1e-6, atol=1e-5)
    # per element the same fp32 expression, cast once to the logits' dtype: bit-identical in bf16; in fp32
    # within an ulp (the CPU kernel vectorises the subtraction differently)
    if dtype == torch.bfloat16:
        assert torch.equal(a.grad, b.grad)
    else:
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    assert torch.all(a.grad[:, -1] == 0) and torch.all(a.grad[0, :4] == 0)


def test_bad_shapes_and_one_token():
    with pytest.raises(ValueError, match="batch, seq"):
        shifted_cross_entropy_sum(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long))
    x = torch.zeros(2, 1, 8, requires_grad=True)
    loss = shifted_cross_entropy_sum(x, torch.zeros(2, 1, dtype=torch.long))
    loss.backward()
    assert loss.item() == 0 and torch.equal(x.grad, torch.zeros_like(x))
