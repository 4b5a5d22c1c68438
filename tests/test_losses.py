"""The chunked causal-LM cross-entropy equals the plain fp32 formula, value and gradient."""

import pytest
import torch
import torch.nn.functional as F

from lorakit.train.losses import (
    FUSED_HEAD_TYPES,
    fused_head_loss,
    fused_head_supported,
    shifted_cross_entropy_sum,
    shifted_linear_cross_entropy_sum,
)


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


# ------------------------------------------------------------------------------------ head + loss fused


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_linear_cross_entropy_matches_head_then_loss(autocast, bias, device):
    """Fused == F.linear (as autocast runs it) + the chunked loss: the same loss and input gradient, with ragged
    chunks across sequences; fp32 within 1e-5 (per-chunk GEMMs may sum in another order), bf16 within 1e-2."""
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(3, 11, 16, generator=gen).to(device)
    head = torch.nn.Linear(16, 40, bias=bias).requires_grad_(False).to(device)
    labels = torch.randint(0, 40, (3, 11), generator=gen).to(device)
    labels[1, :4] = -100
    a, b = hidden.clone().requires_grad_(True), hidden.clone().requires_grad_(True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast):
        mine = shifted_linear_cross_entropy_sum(a, head.weight, head.bias, labels, chunk_elements=7 * 40)
        ref = shifted_cross_entropy_sum(head(b), labels)
    (mine * 0.37).backward()
    (ref * 0.37).backward()
    tol = {"rtol": 1e-2, "atol": 1e-2} if autocast else {"rtol": 1e-5, "atol": 1e-6}
    torch.testing.assert_close(mine, ref, **tol)
    torch.testing.assert_close(a.grad, b.grad, **tol)
    assert a.grad.dtype == torch.float32


def test_linear_cross_entropy_refuses_a_trainable_head():
    with pytest.raises(ValueError, match="frozen output layer"):
        shifted_linear_cross_entropy_sum(torch.zeros(1, 2, 4), torch.zeros(8, 4, requires_grad=True), None,
                                         torch.zeros(1, 2, dtype=torch.long))


def _tiny(kind: str):
    import transformers

    torch.manual_seed(0)
    if kind == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=2))
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=kind == "tied")
    return transformers.LlamaForCausalLM(cfg)


@pytest.mark.parametrize("kind", ["llama", "tied", "gpt2"])
def test_fused_head_loss_in_a_model_equals_its_logits_loss(kind):
    """Inside fused_head_loss the model's .loss is the summed shifted CE of its own logits (no logits formed),
    LoRA gradients agree, and afterwards the model is exactly as before (real logits, default loss)."""
    import lorakit

    model = _tiny(kind)
    model.eval()  # no dropout: the two forward passes must see the same network
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules="all-linear", init="gaussian"))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)  # B = 0 would make the LoRA gradients of A vanish
    assert fused_head_supported(model)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[0, :3] = -100
    before = model(input_ids=ids).logits.detach()

    with fused_head_loss(model):
        mine = model(input_ids=ids, labels=labels).loss
    mine.backward()
    fused_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    ref = shifted_cross_entropy_sum(model(input_ids=ids).logits, labels)
    ref.backward()
    torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
    assert fused_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None} and fused_grads
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(fused_grads[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert torch.equal(model(input_ids=ids).logits, before)  # restored: real logits again
    assert "_loss_function" not in model.__dict__ and "forward" not in model.get_output_embeddings().__dict__


@pytest.mark.parametrize("model_type", FUSED_HEAD_TYPES)
def test_every_listed_model_type_gives_its_logits_loss(model_type):
    """Each listed type's forward must be loss_function(lm_head(hidden)) with nothing in between, in the
    installed transformers: the fused loss equals the loss of the model's own logits."""
    import transformers

    kw = {"vocab_size": 64, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
          "num_attention_heads": 2, "num_key_value_heads": 1, "pad_token_id": 0, "ffn_dim": 32,
          "word_embed_proj_dim": 16} | ({"head_dim": 8} if model_type == "gemma" else {})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(model_type, **kw))
    model.eval().requires_grad_(False)
    with torch.no_grad():  # logits of several units, so that any scaling or capping after the head shows
        model.get_output_embeddings().weight.normal_(0.0, 4.0)
    assert fused_head_supported(model)
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    with fused_head_loss(model):
        mine = model(input_ids=ids, labels=ids).loss
    logits = model(input_ids=ids).logits
    assert logits.std() > 1.0
    torch.testing.assert_close(mine, shifted_cross_entropy_sum(logits, ids), rtol=1e-6, atol=1e-4)


def test_fused_head_is_only_for_frozen_plain_heads_of_listed_models():
    import transformers

    import lorakit

    model = _tiny("llama")
    assert fused_head_supported(model) is False  # full fine-tuning: the head trains
    model.requires_grad_(False)
    assert fused_head_supported(model)
    lorakit.inject(model, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    assert not fused_head_supported(model)  # a LoRA-wrapped head
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8)).requires_grad_(False)
    assert not fused_head_supported(gemma2)  # soft-caps its logits after the head
    assert not fused_head_supported(torch.nn.Linear(2, 2))


def test_a_subclass_with_its_own_forward_is_not_trusted():
    """model_type says llama, but a forward of the user's own may change the logits: no fused head."""
    import transformers

    class Mine(transformers.LlamaForCausalLM):
        def forward(self, *args, **kwargs):
            return super().forward(*args, **kwargs)

    model = Mine(_tiny("llama").config).requires_grad_(False)
    assert not fused_head_supported(model)
