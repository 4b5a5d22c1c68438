"""lorakit.graph_layers: decoder layers replayed as CUDA graphs in training steps.

The capture and replay need a CUDA GPU (these run on the device machine); the refusals run everywhere.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit as lk
from lorakit.errors import ConfigError

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_llama(device="cpu", dtype=torch.float32):
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
                      attn_implementation="sdpa", use_cache=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype)


def test_refuses_a_model_on_the_cpu():
    with pytest.raises(ConfigError, match="CUDA device"):
        lk.graph_layers(tiny_llama())


def test_refuses_a_model_without_known_decoder_layers():
    with pytest.raises(ConfigError, match="LlamaDecoderLayer"):
        lk.graph_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


def test_refuses_warmup_below_one():
    with pytest.raises(ConfigError, match="warmup"):
        lk.graph_layers(tiny_llama(), warmup=0)


def test_embedding_feed_writes_only_a_frozen_embeddings_output_into_the_static():
    """The forward hook graph_layers puts on the input embedding (runs on the CPU: only the hook's rules): a frozen
    embedding's output is written into the first layer's static input and handed on as a new leaf on it; an
    output with autograd history, another shape, or a pending graphed backward are handed on as they are."""
    from lorakit.graphs import _EmbeddingFeed, _Pending, _Shared

    shared = _Shared(pool=None)
    embedding = torch.nn.Embedding(10, 4).requires_grad_(False)
    feed = _EmbeddingFeed(shared, embedding)  # registers itself as the embedding's forward hook
    ids = torch.tensor([[1, 2, 3]])
    out = embedding(ids)  # no static yet: as it is
    assert feed.last() is out
    feed.static = torch.zeros(1, 3, 4).requires_grad_(True)
    fed = embedding(ids)
    assert fed.data_ptr() == feed.static.data_ptr() and not fed.requires_grad and fed.grad_fn is None
    torch.testing.assert_close(feed.static.detach(), embedding.weight[ids], rtol=0, atol=0)
    hook = embedding.register_forward_hook(lambda mod, args, o: o.requires_grad_(True))  # enable_input_require_grads
    fed = embedding(ids)
    assert fed.requires_grad and fed.is_leaf and feed.last() is fed
    hook.remove()
    assert embedding(torch.tensor([[1, 2]])).data_ptr() != feed.static.data_ptr()  # another shape
    token = _Pending()
    shared.layers.append(type("Layer", (), {"pending": lambda self: token})())
    assert embedding(ids).data_ptr() != feed.static.data_ptr()  # a replay's backward still reads the static
    token.done = True
    assert embedding(ids).data_ptr() == feed.static.data_ptr()
    embedding.requires_grad_(True)  # trainable: the output has autograd history, handed on
    out = embedding(ids)
    assert out.grad_fn is not None and out.data_ptr() != feed.static.data_ptr()


def test_folded_norm_hands_on_only_the_last_replays_output_once():
    """The final norm's forward while the last layer's graphs hold it (runs on the CPU: only the rule): the last
    replay's output, already normed, is handed on as it is, once; any other input is normed."""
    import weakref

    from lorakit.graphs import _FoldedNorm

    norm = tiny_llama().model.norm
    folded = _FoldedNorm(norm)
    x = torch.randn(2, 3, 64) * 5
    normed = type(norm).forward(norm, x)
    torch.testing.assert_close(folded(x), normed, rtol=0, atol=0)
    folded.output = weakref.ref(x)  # as the last layer's replay sets it
    assert folded(x) is x  # the replay's output: handed on
    torch.testing.assert_close(folded(x), normed, rtol=0, atol=0)  # once only


def test_checkpointed_norm_keeps_no_copy_of_the_last_replays_output():
    """The final norm's forward while the last layer replays (runs on the CPU: only the rule): on the last
    replay's output, once, it runs as a checkpoint, so it saves none of its fp32 temporaries (Llama's RMSNorm
    keeps an fp32 copy of its input otherwise) and recomputes them in backward, with the same output and input
    gradient bit for bit; any other input is normed as usual."""
    import weakref

    from lorakit.graphs import _CheckpointedNorm

    norm = tiny_llama().model.norm.to(torch.bfloat16)
    wrapped = _CheckpointedNorm(norm)

    def run(fn, x):
        saved = []
        x = x.detach().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = fn(x)
        y.float().pow(2).sum().backward()
        # what it keeps beside the input (torch 2.11's checkpoint also saves an empty placeholder)
        return y, x.grad, [t for t in saved if t.numel() and t.data_ptr() != x.data_ptr()]

    x = torch.randn(2, 3, 64, dtype=torch.bfloat16) * 5
    y_plain, g_plain, saved_plain = run(lambda t: type(norm).forward(norm, t), x)
    assert any(t.dtype == torch.float32 and t.numel() == x.numel() for t in saved_plain)  # the copy it keeps

    def replayed(t):
        wrapped.output = weakref.ref(t)  # as the last layer's replay sets it
        return wrapped(t)

    y, g, saved = run(replayed, x)
    assert saved == [] and wrapped.output() is None  # nothing kept but the input (no copy); once only
    assert torch.equal(y, y_plain) and torch.equal(g, g_plain)
    y_other, _, saved_other = run(wrapped, x)  # not the replay's output: normed as usual
    assert torch.equal(y_other, y_plain) and len(saved_other) == len(saved_plain)


def test_a_layer_does_not_capture_after_a_later_layer_has():
    """The layers share one graph pool, safe only when they capture in forward order; the rule runs on the CPU."""
    from lorakit.graphs import GraphedLayer, _Shared

    shared = _Shared(pool=None)
    layers = [GraphedLayer(torch.nn.Linear(2, 2), shared, warmup=1) for _ in range(3)]
    shared.layers.extend(layers)
    assert not any(shared.captured_after(g) for g in layers)
    layers[1].captured = object()  # as if layer 1 had captured first
    assert shared.captured_after(layers[0])
    assert not shared.captured_after(layers[1]) and not shared.captured_after(layers[2])


def test_output_flags_that_are_off_do_not_make_a_call_eager():
    """Some model forwards (liger-kernel's fused linear + cross-entropy one) pass output_attentions=False and
    output_hidden_states=False down to the decoder layers: those calls may be graphed; a flag that is on may not.
    The rule runs on the CPU (the call then stops at the next rule: the device)."""
    from lorakit.graphs import GraphedLayer, _Shared

    graphed = GraphedLayer(torch.nn.Linear(4, 4).train(), _Shared(pool=None), warmup=1)
    hidden, rope = torch.zeros(1, 2, 4), (torch.zeros(1, 2, 2), torch.zeros(1, 2, 2))
    off = {"output_attentions": False, "output_hidden_states": None, "cache_position": None}
    assert graphed._graph_inputs((hidden,), {"position_embeddings": rope, **off})[1] == "hidden states not a CUDA tensor"
    why = graphed._graph_inputs((hidden,), {"position_embeddings": rope, "output_attentions": True})[1]
    assert why.startswith("other arguments") and "output_attentions" in why


@cuda
def test_layers_called_with_output_flags_off_replay():
    """A forward that passes output_attentions=False / output_hidden_states=False to its decoder layers (as
    liger-kernel's does) replays the graphs and computes what the eager step does."""
    model = lora_model()
    (ids,) = batches(1)
    eager = step_grads(model, ids)
    lk.graph_layers(model, warmup=1)
    inner = model.model.forward

    def forward(*args, **kwargs):
        return inner(*args, output_attentions=False, output_hidden_states=False, **kwargs)

    model.model.forward = forward
    for _ in range(3):
        loss, grads = step_grads(model, ids)
    assert lk.graphed_replays(model) == 4, lk.eager_calls(model)
    torch.testing.assert_close(loss, eager[0], rtol=1e-5, atol=1e-5)
    for name, g in grads.items():
        torch.testing.assert_close(g, eager[1][name], rtol=1e-4, atol=1e-5)
    del model.model.forward
    lk.ungraph_layers(model)


def lora_model(device="cuda", ckpt=False, dropout=0.0):
    model = tiny_llama(device, torch.float32)
    if ckpt:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    lk.inject(model, lk.LoraConfig(r=4, alpha=8, target_modules=TARGETS, dropout=dropout))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


def step_grads(model, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


def batches(n, shape=(2, 16)):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 128, shape, generator=gen).cuda() for _ in range(n)]


@cuda
@pytest.mark.parametrize("ckpt", [False, True])
def test_graphed_steps_match_eager_steps(ckpt):
    model = lora_model(ckpt=ckpt)
    data = batches(5)
    eager = [step_grads(model, ids) for ids in data]
    assert lk.graph_layers(model, warmup=1) == 2
    from lorakit.graphs import _CheckpointedNorm

    norm = model.model.norm.__dict__.get("forward")
    assert isinstance(norm, _CheckpointedNorm)  # the final norm keeps no copy of the last replay's output
    calls = []
    norm_forward = norm.norm_forward
    norm.norm_forward = lambda *a: calls.append(1) or norm_forward(*a)
    graphed = [step_grads(model, ids) for ids in data]
    assert lk.graphed_replays(model) == 2 * 4  # call 1 eager (warm-up), call 2 captures and replays, ...
    assert len(calls) == 5 + 4  # once a step, and again in the backward of the four replayed steps
    last = model.model.layers[-1].forward.captured  # checkpointed: its output lives in the input-gradient buffer
    assert (last.output.data_ptr() == last.grad_output.data_ptr()) == ckpt
    for (le, ge), (lg, gg) in zip(eager, graphed):
        torch.testing.assert_close(lg, le, rtol=1e-5, atol=1e-6)
        for name in ge:
            torch.testing.assert_close(gg[name], ge[name], rtol=1e-4, atol=1e-6)
    assert lk.ungraph_layers(model) == 2
    assert model.model.layers[0].gradient_checkpointing == ckpt
    assert "forward" not in model.model.norm.__dict__


@cuda
def test_gradients_accumulate_over_micro_batches():
    model = lora_model()
    a, b = batches(2)
    lk.graph_layers(model, warmup=1)
    step_grads(model, a)  # warm-up and capture
    expected = {}
    for ids in (a, b):
        _, grads = step_grads(model, ids)
        for n, g in grads.items():
            expected[n] = expected.get(n, 0) + g
    for ids in (a, b):  # no zero_grad between: the second adds to the first
        model(input_ids=ids, labels=ids).loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, expected[n], rtol=1e-5, atol=1e-6)


@cuda
def test_calls_that_differ_from_the_capture_run_eagerly_and_correctly():
    model = lora_model()
    a, b = batches(2)
    short = batches(1, (2, 8))[0]
    lk.graph_layers(model, warmup=1)
    step_grads(model, a)  # eager warm-up
    step_grads(model, a)  # capture and replay
    replays = lk.graphed_replays(model)
    assert replays == 2
    loss_eager_short = step_grads(model, short)[0]  # another shape: eager
    assert lk.graphed_replays(model) == replays
    for _, layer in lk.lora_layers(model):
        layer.disabled = True
    loss_off = model(input_ids=b, labels=b).loss  # LoRA disabled: not the captured state, eager
    with torch.no_grad():
        off = model(input_ids=b, labels=b).loss  # no grad: eager
    assert lk.graphed_replays(model) == replays
    torch.testing.assert_close(loss_off.detach(), off)
    for _, layer in lk.lora_layers(model):
        layer.disabled = False
    step_grads(model, a)  # the captured state again: replays
    assert lk.graphed_replays(model) == replays + 2
    lk.ungraph_layers(model)
    torch.testing.assert_close(step_grads(model, short)[0], loss_eager_short)


@cuda
def test_second_forward_before_backward_runs_eagerly():
    model = lora_model()
    a, b = batches(2)
    lk.graph_layers(model, warmup=1)
    step_grads(model, a)
    la = model(input_ids=a, labels=a).loss  # replays
    lb = model(input_ids=b, labels=b).loss  # a's backward pending: eager
    (la + lb).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    lk.ungraph_layers(model)
    (model(input_ids=a, labels=a).loss + model(input_ids=b, labels=b).loss).backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6)


@cuda
def test_embedding_output_is_written_into_the_first_layers_static_input():
    """After the capture the embedding writes into layer 0's static input (no copy of its output kept); an eager
    call of layer 0 reads a copy, so a second forward's embedding output does not change what its backward reads."""
    model = lora_model()
    a, b = batches(2)
    lk.graph_layers(model, warmup=1)
    step_grads(model, a)  # warm-up
    step_grads(model, a)  # capture
    first = model.model.layers[0].forward.captured
    seen = []
    hook = model.model.embed_tokens.register_forward_hook(lambda mod, args, out: seen.append(out.data_ptr()))
    replays = lk.graphed_replays(model)

    def two_forwards():  # LoRA off for the first (not the captured state: eager), on for the second (replays)
        for _, layer in lk.lora_layers(model):
            layer.disabled = True
        la = model(input_ids=a, labels=a).loss
        for _, layer in lk.lora_layers(model):
            layer.disabled = False
        lb = model(input_ids=b, labels=b).loss
        (la + lb).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
        return grads

    got = two_forwards()
    assert seen == [first.inputs[0].data_ptr()] * 2
    assert lk.graphed_replays(model) == replays + 2
    hook.remove()
    lk.ungraph_layers(model)
    want = two_forwards()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


@cuda
def test_final_norm_is_folded_into_the_checkpointed_last_layer(monkeypatch):
    """With FOLD_FINAL_NORM and checkpointing the last layer's graphs hold the final norm; the steps match eager
    ones, a hook on that layer makes it run eagerly (and the norm then runs on its own), and ungraph_layers
    restores the norm."""
    from lorakit import graphs
    from lorakit.graphs import _FoldedNorm

    monkeypatch.setattr(graphs, "FOLD_FINAL_NORM", True)
    model = lora_model(ckpt=True)
    a, b = batches(2)
    _, want = step_grads(model, b)
    lk.graph_layers(model, warmup=1)
    assert isinstance(model.model.norm.__dict__.get("forward"), _FoldedNorm)
    step_grads(model, a)  # warm-up
    step_grads(model, a)  # capture
    replays = lk.graphed_replays(model)
    _, got = step_grads(model, b)
    assert lk.graphed_replays(model) == replays + 2
    hook = model.model.layers[-1].register_forward_hook(lambda mod, args, out: None)
    _, hooked = step_grads(model, b)
    hook.remove()
    assert lk.graphed_replays(model) == replays + 3  # layer 0 replayed, the hooked last layer eager
    assert lk.eager_calls(model)["hooks on the last layer or the final norm, which its graphs hold"] == 1
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(hooked[name], want[name], rtol=1e-4, atol=1e-6)
    lk.ungraph_layers(model)
    assert "forward" not in model.model.norm.__dict__


@cuda
def test_backward_twice_is_refused():
    model = lora_model()
    a = batches(1)[0]
    lk.graph_layers(model, warmup=1)
    step_grads(model, a)
    loss = model(input_ids=a, labels=a).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="ran twice"):
        loss.backward()


@cuda
def test_checkpointed_layers_with_dropout_run_eagerly():
    model = lora_model(ckpt=True, dropout=0.1)
    a = batches(1)[0]
    lk.graph_layers(model, warmup=1)
    for _ in range(3):
        step_grads(model, a)
    assert lk.graphed_replays(model) == 0


def captured_two_layers():
    """A LoRA model graphed, warmed up and captured (two steps on one batch), another batch, and its two layers'
    captures."""
    model = lora_model()
    a, b = batches(2)
    lk.graph_layers(model, warmup=1)
    step_grads(model, a)
    step_grads(model, a)  # capture
    first, second = (layer.forward.captured for layer in model.model.layers)
    return model, b, first, second


@cuda
def test_layers_are_chained_in_place_and_a_new_input_runs_eagerly():
    model, b, first, second = captured_two_layers()
    assert not first.chained and second.chained  # layer 1 reads layer 0's static output, no copy, no own buffer
    assert second.inputs[0].data_ptr() == first.output.data_ptr()
    assert first.grad_output is second.grad_output  # one input-gradient buffer for the model
    _, expected = step_grads(model, b)
    replays = lk.graphed_replays(model)
    hook = model.model.layers[0].register_forward_hook(lambda mod, args, out: out * 1.0)  # a new tensor
    _, got = step_grads(model, b)
    hook.remove()
    assert lk.graphed_replays(model) == replays + 1  # layer 0 replayed; layer 1 got another input: eager
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    step_grads(model, b)
    assert lk.graphed_replays(model) == replays + 3


@cuda
def test_layers_share_gradient_buffers_and_position_embeddings():
    """One set of parameter-gradient buffers and one static cos / sin for all layers; a layer handed other
    position embeddings while an earlier layer's backward is pending runs eagerly, and the gradients stay right."""
    model, b, first, second = captured_two_layers()
    n = len(first.params)  # the parameters' gradients come last (layer 1's input gradient comes first)
    assert n == len(second.params) == 14
    assert [g.data_ptr() for g in first.grads[-n:]] == [g.data_ptr() for g in second.grads[-n:]]
    assert first.inputs[1] is second.inputs[1] and first.inputs[2] is second.inputs[2]
    _, expected = step_grads(model, b)
    replays = lk.graphed_replays(model)

    def other_rope(module, args, kwargs):  # the same values in new tensors, or shifted positions
        cos, sin = kwargs["position_embeddings"]
        kwargs["position_embeddings"] = (cos * scale, sin * scale)
        return args, kwargs

    scale = 1.0
    hook = model.model.layers[1].register_forward_pre_hook(other_rope, with_kwargs=True)
    _, got = step_grads(model, b)
    assert lk.graphed_replays(model) == replays + 1  # layer 0 replayed; layer 1 eager, layer 0's cos still read
    assert lk.eager_calls(model)["other position embeddings than those of the graphed layers whose backward is "
                                 "pending"] == 1
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-6)
    scale = 0.5  # other values: compared with the same hook on the layers' own forwards
    _, got = step_grads(model, b)
    lk.ungraph_layers(model)
    _, want = step_grads(model, b)
    hook.remove()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6)


@cuda
def test_graphed_steps_under_autocast_match_eager_steps():
    """fp32 adapters under autocast(bf16), as lorakit train runs them: the capture turns the weight cache off,
    so the casts are in the graph and follow the optimizer's updates."""
    model = lora_model()
    data = batches(4)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05)
    start = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def run():
        out = []
        for ids in data:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            out.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
            opt.step()  # the weights change in place between steps: a cached cast would go stale
            opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in start:
                    p.copy_(start[n])
        return out

    eager = run()
    lk.graph_layers(model, warmup=1)
    graphed = run()
    assert lk.graphed_replays(model) == 2 * 3
    for (le, ge), (lg, gg) in zip(eager, graphed):
        torch.testing.assert_close(lg, le, rtol=1e-3, atol=1e-3)
        for name in ge:
            scale = ge[name].abs().max().clamp_min(1e-6)
            assert (gg[name] - ge[name]).abs().max() / scale < 2e-2, name
