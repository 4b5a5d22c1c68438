"""Causal-LM cross-entropy without the full-vocabulary fp32 copies, and without the logits at all.

``F.cross_entropy(logits[:, :-1].reshape(-1, V).float(), ...)`` keeps, for a Llama-3 vocabulary (128k) at
2 x 2048 tokens, a shifted bf16 copy (1 GiB), the fp32 upcast (2 GiB) and the fp32 log-softmax saved for
backward (2 GiB), and its backward makes two more fp32 buffers: about 5 GiB at the step's peak, as much as the
whole 4-bit 8B model.

* ``shifted_cross_entropy_sum`` (any model): row chunks of the logits, fp32 only per chunk; it saves nothing but
  the logits, and backward recomputes each chunk's log-softmax. Each gradient element is the expression
  autograd evaluates, ``grad_out * exp(log_softmax) - grad_out * onehot`` in fp32, cast once.
* ``fused_head_loss`` / ``shifted_linear_cross_entropy_sum`` (a frozen plain head of the listed model types):
  the output layer too is applied chunk by chunk, with the input gradient computed in the same pass, so the
  (tokens x vocab) logits never exist (the trainer's default where it applies).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

CHUNK_ELEMENTS = 1 << 26  # 64M fp32 values (256 MiB) per chunk: 523 rows of a 128k vocabulary


def _shifted_targets(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Flat targets for the flat logits rows: row (b, t) predicts labels[b, t + 1]; each last position none."""
    pad = torch.full_like(labels[:, :1], ignore_index)
    return torch.cat([labels[:, 1:], pad], dim=1).reshape(-1)


def _spans(rows: int, vocab: int, chunk_elements: int):
    step = max(1, chunk_elements // vocab)
    for r0 in range(0, rows, step):
        yield r0, min(r0 + step, rows)


def _target_terms(targets: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(column index of each row's target, 1.0 for rows with a target and 0.0 for ignored ones), shaped
    (rows, 1) for scatter_add_ and broadcasting."""
    keep = (targets != ignore_index).unsqueeze(1)
    return targets.clamp_min(0).unsqueeze(1), keep.float()


def _softmax_minus_onehot_(probs: torch.Tensor, index: torch.Tensor, keep: torch.Tensor, g: torch.Tensor | float):
    """In place: g * probs - g at each row's target, zero on ignored rows (prompt, padding, last position).
    ``probs`` = exp(log_softmax); the rounding is autograd's: g * p, then + (-g)."""
    if not isinstance(g, float) or g != 1.0:
        probs.mul_(g)
    probs.scatter_add_(1, index, -g * keep)
    return probs.mul_(keep)


class _ShiftedCrossEntropySum(torch.autograd.Function):
    """No host synchronisation inside (no nonzero / boolean indexing): the GPU queue stays full."""

    @staticmethod
    def forward(ctx, logits, labels, ignore_index, chunk_elements):
        flat = logits.reshape(-1, logits.shape[-1])
        targets = _shifted_targets(labels, ignore_index)
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for r0, r1 in _spans(flat.shape[0], flat.shape[1], chunk_elements):
            total += F.cross_entropy(flat[r0:r1].float(), targets[r0:r1], ignore_index=ignore_index,
                                     reduction="sum")
        ctx.save_for_backward(logits, targets)
        ctx.ignore_index, ctx.chunk_elements = ignore_index, chunk_elements
        return total

    @staticmethod
    def backward(ctx, grad_out):
        logits, targets = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = torch.empty_like(flat)
        g = grad_out.float()
        index, keep = _target_terms(targets, ctx.ignore_index)
        for r0, r1 in _spans(flat.shape[0], flat.shape[1], ctx.chunk_elements):
            probs = torch.log_softmax(flat[r0:r1].float(), dim=-1).exp_()
            grad[r0:r1] = _softmax_minus_onehot_(probs, index[r0:r1], keep[r0:r1], g)
        return grad.view_as(logits), None, None, None


def shifted_cross_entropy_sum(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
                              chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """Sum over b, t of the fp32 cross-entropy of ``logits[b, t]`` against ``labels[b, t + 1]``.

    ``logits``: (batch, seq, vocab) in any float dtype; ``labels``: (batch, seq) with ``ignore_index`` for
    positions that are not targets. Equal to the unchunked fp32 formula up to summation order.
    """
    if logits.ndim != 3 or labels.shape != logits.shape[:2]:
        raise ValueError(f"logits (batch, seq, vocab) and labels (batch, seq) expected, got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")
    if logits.shape[1] < 2:
        return logits.sum() * 0.0
    return _ShiftedCrossEntropySum.apply(logits, labels, ignore_index, chunk_elements)


# ------------------------------------------------------------------------------------ head + loss fused
class _ShiftedLinearCrossEntropySum(torch.autograd.Function):
    """sum_t CE(hidden[t] @ W.T + b, labels[t + 1]) with the logits formed one row chunk at a time: the
    (tokens x vocab) logits never exist. The input gradient is computed in the same pass, for an upstream
    gradient of 1, and scaled in backward (no second head GEMM): autograd would round g * (p - onehot) to the
    logits' dtype before the GEMM, here p - onehot is rounded and the GEMM's result scaled, so the two agree
    to the dtype's rounding, not bit for bit. W (and b) must be frozen."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, ignore_index, chunk_elements):
        dev = hidden.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
        if dtype is not None:  # cast once, as autocast would, not per chunk
            weight, bias = weight.to(dtype), None if bias is None else bias.to(dtype)
        flat = hidden.reshape(-1, hidden.shape[-1])
        targets = _shifted_targets(labels, ignore_index)
        index, keep = _target_terms(targets, ignore_index)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad = None
        if ctx.needs_input_grad[0]:
            grad = torch.empty(flat.shape, dtype=dtype or weight.dtype, device=flat.device)
        for r0, r1 in _spans(flat.shape[0], weight.shape[0], chunk_elements):
            logits = _head(flat[r0:r1], weight, bias, dtype)
            logp = torch.log_softmax(logits.float(), dim=-1)
            total += F.nll_loss(logp, targets[r0:r1], ignore_index=ignore_index, reduction="sum")
            if grad is not None:  # for an upstream gradient of 1; backward scales it
                probs = _softmax_minus_onehot_(logp.exp_(), index[r0:r1], keep[r0:r1], 1.0)
                grad[r0:r1] = probs.to(logits.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.hidden_shape, ctx.hidden_dtype = hidden.shape, hidden.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        (grad,) = ctx.saved_tensors
        scaled = (grad.float() * grad_out.float()).to(ctx.hidden_dtype)
        return scaled.view(ctx.hidden_shape), None, None, None, None, None


def _head(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype | None):
    """The output layer as autocast runs it (the input cast to the autocast dtype; ``weight`` and ``bias``
    already are), or as is without autocast."""
    if dtype is not None:
        x = x.to(dtype)
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x, weight, bias)


def shifted_linear_cross_entropy_sum(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                                     labels: torch.Tensor, ignore_index: int = -100,
                                     chunk_elements: int = CHUNK_ELEMENTS) -> torch.Tensor:
    """``shifted_cross_entropy_sum(F.linear(hidden, weight, bias), labels)`` without the logits tensor: for a
    frozen output layer (``weight``/``bias`` get no gradient). ``hidden``: (batch, seq, features)."""
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise ValueError("the fused head + loss is for a frozen output layer (its weight gets no gradient)")
    if hidden.ndim != 3 or labels.shape != hidden.shape[:2]:
        raise ValueError(f"hidden (batch, seq, features) and labels (batch, seq) expected, got "
                         f"{tuple(hidden.shape)} and {tuple(labels.shape)}")
    if hidden.shape[1] < 2:
        return hidden.sum() * 0.0
    return _ShiftedLinearCrossEntropySum.apply(hidden, weight, bias, labels, ignore_index, chunk_elements)


FUSED_HEAD_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi", "phi3", "gemma", "olmo", "olmo2", "starcoder2",
                    "smollm3", "stablelm", "gpt_neox", "opt", "falcon", "bloom", "gpt2", "cohere", "granite")
"""Model types whose causal-LM forward is ``loss_function(lm_head(hidden), labels)`` with nothing nonlinear
in between: Cohere's and Granite's constant logit scale commutes with a bias-free head
(scaling the hidden states scales the logits), Gemma 2/3's soft-capping does not, and MoE models may add a
router loss. Only these get the fused head; tests/test_losses.py checks each against its own logits."""
SCALED_LOGITS = ("cohere", "granite")


def fused_head_supported(model: torch.nn.Module) -> bool:
    """Whether ``fused_head_loss`` applies: a transformers *ForCausalLM (or GPT2LMHeadModel) of a listed type
    whose output layer is a frozen plain nn.Linear (not LoRA-wrapped, not quantized) and whose loss_function
    can be set (transformers >= 4.46)."""
    config = getattr(model, "config", None)
    head = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if config is None or getattr(config, "model_type", None) not in FUSED_HEAD_TYPES or head is None:
        return False
    classes = {c.__name__ for c in type(model).__mro__}  # the MRO: FSDP2 subclasses the model's class
    if not any(n.endswith("ForCausalLM") or n == "GPT2LMHeadModel" for n in classes):
        return False  # e.g. GPT2DoubleHeadsModel: same model type, another forward
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - the trainer needs transformers anyway
        return False
    if not isinstance(model, PreTrainedModel) or not hasattr(type(model), "loss_function"):
        return False  # e.g. a PEFT wrapper: setting its loss_function would not reach the model inside
    if not getattr(type(model).forward, "__module__", "").startswith("transformers.models."):
        return False  # a subclass with its own forward may do anything to the logits
    if type(head) is not torch.nn.Linear:  # also excludes a head FSDP2 shards on its own (class FSDPLinear)
        return False
    if head.bias is not None and config.model_type in SCALED_LOGITS:
        return False  # c * (W h + b) != W (c h) + b
    return not any(p.requires_grad for p in head.parameters())


@contextlib.contextmanager
def fused_head_loss(model: torch.nn.Module, ignore_index: int = -100):
    """Inside, ``model(..., labels=labels).loss`` is the *sum* of the shifted token cross-entropies computed by
    ``shifted_linear_cross_entropy_sum`` (the output layer passes the hidden states through and the model's
    loss_function applies the layer chunk by chunk), and ``.logits`` holds the hidden states. Everything runs
    inside the model's forward, so FSDP2 has the (root-held) head weight gathered. Outside, nothing changed."""
    head = model.get_output_embeddings()
    had_own = "_loss_function" in model.__dict__
    old = model.__dict__.get("_loss_function")

    def loss_function(logits, labels, vocab_size=None, **_):
        return shifted_linear_cross_entropy_sum(logits, head.weight, head.bias, labels, ignore_index)

    own_forward = head.__dict__.get("forward")
    head.forward = lambda x: x
    model.loss_function = loss_function
    try:
        yield model
    finally:
        if own_forward is None:
            del head.forward
        else:
            head.forward = own_forward
        if had_own:
            model._loss_function = old
        else:
            del model._loss_function


__all__ = ["CHUNK_ELEMENTS", "FUSED_HEAD_TYPES", "fused_head_loss", "fused_head_supported",
           "shifted_cross_entropy_sum", "shifted_linear_cross_entropy_sum"]
