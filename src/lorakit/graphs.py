"""CUDA graphs of a model's decoder layers for training steps of one fixed shape.

Why: where the GPU's host is slow next to it, a LoRA step waits on the host's kernel launches (docs/speed.md, "Where
a LoRA step waits": on the H200 a LoRA layer costs the host ~370 us a step more than the frozen layer, and a 1B
step's forward sat idle 9 ms). Each graphed decoder layer replays its forward and its backward as one CUDA
graph each: a few hundred launches become two.

    lk.graph_layers(model)     # after inject; the first training calls run eagerly, the next one captures
    ...train as usual...
    lk.ungraph_layers(model)

A call replays the layer's graphs only when everything it depends on is as at the capture (otherwise it runs
eagerly, as without graphs, and nothing is lost):
- training mode with grad enabled, on CUDA, not inside torch.compile or another capture;
- the same shapes, dtypes and devices of the inputs (pack or pad batches to one length);
- no attention mask (causal SDPA over full rows), no KV cache, no other keyword arguments;
- the same parameters (storage and requires_grad) and the same LoRA state (active, merged, disabled adapters);
- forward and backward alternating: a second forward before the first one's backward runs eagerly;
- captured in forward order: a layer that had not captured when a later layer did stays eager (the shared pool
  is safe only in that order).
With gradient checkpointing on the layer (transformers' ``gradient_checkpointing_enable``) the graphs hold
torch's non-reentrant checkpoint of the layer: the forward keeps only the layer's input and the backward
recomputes what it needs. That mode refuses layers with dropout (the recompute would draw other masks): they
run eagerly. Checkpointing is read when ``graph_layers`` is called: enable it before.

All graphed layers of one model share one memory pool, so their temporaries reuse each other's memory; a
layer's saved activations stay allocated between steps. The layers are chained without copies or extra buffers:
a layer whose input is the previous graphed layer's output reads that output in place, and every layer's backward
leaves its input's gradient in one buffer per model, the one the previous layer's backward reads (a layer
whose input is anything else than the captured one then runs eagerly). So, as with
torch.cuda.make_graphed_callables, a graphed layer's output and its input's gradient are valid only until the
step's backward has run past them (hidden states returned by ``output_hidden_states=True`` included).
Each backward graph leaves its parameters' gradients in buffers that all layers of one shape share (so the graphs
hold one set of them, not one per layer); the replay hands copies of them on, so accumulating over micro-batches
is exact. The layers also read one static cos and sin: a layer whose position embeddings differ from those of a
layer whose backward is still pending runs eagerly. A checkpointed last layer leaves its output in the
input-gradient buffer, which the backward overwrites; its graphs may also hold the model's final norm
(FOLD_FINAL_NORM, off by default; a call with hooks on that layer or the norm then runs eagerly). Where the
first layer's input is the model's input embedding output, the embedding's output is written straight into that
layer's static input (a forward hook), so the model's ``inputs_embeds`` as the layers see them are valid until
the next forward too; an eager call of the first layer reads a copy.
"""

from __future__ import annotations

import collections
import contextlib
import weakref
from dataclasses import dataclass, field

import torch
import torch.utils.checkpoint
from torch import nn

from . import registry
from .blocks import _has_hooks
from .errors import ConfigError
from .layers import LoraLayer

_ALLOWED_KWARGS = {"attention_mask", "position_embeddings", "position_ids", "cache_position", "cache",
                   "past_key_values", "past_key_value", "use_cache"}
"""Keyword arguments a decoder layer may get in a graphed call; the position ids only feed a KV cache, which a
graphed call has none of. Any other keyword argument makes the call eager."""

_OFF_FLAGS = {"output_attentions", "output_hidden_states"}
"""Keyword arguments a graphed call may get only when false or None: some model forwards pass them down to the
decoder layers (liger-kernel's fused linear + cross-entropy forward does, as False), where they change nothing."""


def _dead() -> None:
    """A weakref that holds nothing."""


@dataclass
class _Shared:
    """What the graphed layers of one model share: the memory pool, the static outputs of their forward graphs
    (by data pointer: a layer whose input is one of them reads it in place), and one input-gradient buffer per
    shape and dtype (each backward graph writes its input's gradient there, the next backward reads it)."""

    pool: tuple
    stream: torch.cuda.Stream | None = None  # every capture's: its lazy state is warmed up once
    warmed: bool = False
    outputs: dict = field(default_factory=dict)
    grad_buffers: dict = field(default_factory=dict)
    layers: list = field(default_factory=list)  # the GraphedLayers
    rope: dict = field(default_factory=dict)  # (shape, dtype, device, "cos" or "sin") -> _StaticRope
    feed: _EmbeddingFeed | None = None  # the forward hook on the model's input embedding

    def buffer(self, like: torch.Tensor, which: object = None) -> torch.Tensor:
        """One buffer per shape, dtype and ``which`` for all the layers: the input gradient (which None), and the
        parameter gradients (which: the parameter's rank among the layer's parameters of its shape). Layers of
        one shape leave their parameters' gradients in the same buffers, which the replay copies out at once, so
        their graphs keep no copy of the gradients each."""
        key = (like.shape, like.dtype, like.device, which)
        if key not in self.grad_buffers:
            self.grad_buffers[key] = torch.empty_like(like, memory_format=torch.contiguous_format)
        return self.grad_buffers[key]

    def rope_slots(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[_StaticRope, _StaticRope]:
        """The one static cos and sin all graphed layers read: the model computes them once per forward, so the
        layers need no copy each (32 layers x 2 x 0.5 MiB on the 8B shape)."""
        slots = []
        for which, like in (("cos", cos), ("sin", sin)):
            key = (like.shape, like.dtype, like.device, which)
            if key not in self.rope:
                self.rope[key] = _StaticRope(like.detach().clone())
            slots.append(self.rope[key])
        return slots[0], slots[1]

    def rope_loadable(self, slots: tuple[_StaticRope, ...], new: tuple[torch.Tensor, ...]) -> bool:
        """Whether ``new`` (cos, sin) may be loaded into ``slots``: they hold them already, or no layer's backward
        still reads what they hold."""
        return all(slot.holds(t) for slot, t in zip(slots, new)) or not self.backward_pending()

    def captured_after(self, graphed: GraphedLayer) -> bool:
        """A layer after ``graphed`` has captured already. Why it matters: the layers' graphs share one pool, which
        is safe because they capture in the order the forward replays them, so a layer's saved activations and
        static tensors only ever take memory that earlier captures use as temporaries, and those graphs do not
        run while they are live. A later capture of an earlier layer could take the temporaries of a graph that
        runs in between (e.g. the last layer's backward) for its saved activations."""
        i = next((i for i, g in enumerate(self.layers) if g is graphed), len(self.layers))
        return any(g.captured is not None for g in self.layers[i + 1:])

    def backward_pending(self) -> bool:
        """A graphed layer of the model has replayed its forward and not yet its backward."""
        return any((token := g.pending()) is not None and not token.done for g in self.layers)


@dataclass
class _StaticRope:
    """A static cos (or sin) and the tensor last copied into it (a weakref and its version), so that a replay
    copies only when the model hands a new one."""

    static: torch.Tensor
    source: object = None
    version: int = -1

    def holds(self, new: torch.Tensor) -> bool:
        return self.source is not None and self.source() is new and self.version == _version(new)

    def load(self, new: torch.Tensor) -> None:
        if not self.holds(new):
            self.static.copy_(new)
            self.source, self.version = weakref.ref(new), _version(new)


class _EmbeddingFeed:
    """A forward hook on the model's input embedding. Once the first layer's capture reads the embedding output,
    the hook writes each later output straight into that layer's static input and hands on a new leaf on it, so
    the embedding output itself is freed at once. Why: under gradient checkpointing the embedding output is a
    leaf that requires grad (``enable_input_require_grads``) and its gradient accumulator keeps it alive until the
    backward; beside the layer's static copy that is one hidden-sized tensor more than eager (32 MiB on the 8B
    shape). An output with its own autograd history (a trainable embedding) is handed on as it is."""

    def __init__(self, shared: _Shared, embedding: nn.Module):
        self.shared = shared
        self.static: torch.Tensor | None = None  # the first layer's static input, once its capture reads the output
        self.last = _dead  # weakref to the output last handed on
        self.handle = embedding.register_forward_hook(self)

    def __call__(self, module: nn.Module, args, output):
        if not isinstance(output, torch.Tensor):
            return None
        if not self._feeds(module, output):
            self.last = weakref.ref(output)
            return None
        self.static.detach().copy_(output)
        fed = self.static.detach().requires_grad_(output.requires_grad)
        self.last = weakref.ref(fed)
        return fed

    def _feeds(self, module: nn.Module, output: torch.Tensor) -> bool:
        static = self.static
        return (static is not None and output.grad_fn is None and module.training and torch.is_grad_enabled()
                and (output.shape, output.dtype, output.device, output.stride())
                == (static.shape, static.dtype, static.device, static.stride())
                and not torch.compiler.is_compiling()
                and not (output.is_cuda and torch.cuda.is_current_stream_capturing())
                and not self.shared.backward_pending())  # a pending replay's backward still reads the static


@dataclass
class _Captured:
    """One layer's two graphs and the static tensors they read and write."""

    key: tuple
    fwd: torch.cuda.CUDAGraph
    bwd: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # hidden states (the previous graphed layer's output if chained), cos, sin
    rope: tuple[_StaticRope, _StaticRope]  # inputs[1:], the statics shared by the layers
    chained: bool  # inputs[0] is another graphed layer's static output: never copied into, a new input runs eagerly
    output: torch.Tensor
    grad_output: torch.Tensor  # the model's shared input-gradient buffer
    grads: tuple[torch.Tensor | None, ...]  # the hidden states' then the params': all buffers shared by the layers
    params: tuple[nn.Parameter, ...]
    keep_alive: object  # what must stay allocated: the forward's autograd graph (saved tensors), a folded norm's input


_OTHER_ROPE = "other position embeddings than those of the graphed layers whose backward is pending"
_OUT_OF_ORDER = "not captured before a later layer was (the layers' shared pool needs them captured in order)"


def _version(t: torch.Tensor) -> int:
    """t's version counter (in-place writes bump it); inference tensors have none."""
    return -1 if t.is_inference() else t._version


class _Pending:
    """A replayed forward whose backward has not run yet; dies with the autograd graph that holds it."""

    done = False


class _FinalNorm:
    """Installed as the final norm's ``forward`` by graph_layers: the last graphed layer sets ``output`` at each
    replay, and a call on that output (once, no other arguments) is treated specially by the subclass."""

    def __init__(self, norm: nn.Module):
        self.norm = norm
        self.norm_forward = type(norm).forward.__get__(norm)  # the class's own, under this instance attribute
        self.output = _dead  # weakref to the last replay's output

    def _on_replay_output(self, hidden, args, kwargs) -> bool:
        """True (once) where ``hidden`` is the last replay's output, called without other arguments."""
        if not args and not kwargs and hidden is self.output():
            self.output = _dead
            return True
        return False


class _FoldedNorm(_FinalNorm):
    """Where the last layer's graphs hold the final norm (FOLD_FINAL_NORM): the output of the last layer's
    replay is already normed and is handed on as it is, once; anything else is normed."""

    def __call__(self, hidden, *args, **kwargs):
        if self._on_replay_output(hidden, args, kwargs):
            return hidden
        return self.norm_forward(hidden, *args, **kwargs)


class _CheckpointedNorm(_FinalNorm):
    """Where the norm is not folded (CHECKPOINT_FINAL_NORM): on the last replay's output, static memory of the
    graphs, the norm runs as a checkpoint of its own, so its backward recomputes from that output instead of
    keeping its own copy; any other input is normed as usual. Why: eager frees the last layer's 16-bit output
    once the norm has read it (Llama's RMSNorm keeps an fp32 copy of it instead: 64 MiB on the 8B shape); the
    graphs keep the output anyway (a static buffer), so without this a graphed step holds both through the head
    and the loss."""

    def __call__(self, hidden, *args, **kwargs):
        if (torch.is_grad_enabled() and not _has_hooks(self.norm)
                and self._on_replay_output(hidden, args, kwargs)):
            return torch.utils.checkpoint.checkpoint(self.norm_forward, hidden, use_reentrant=False,
                                                     preserve_rng_state=False)
        return self.norm_forward(hidden, *args, **kwargs)


CHECKPOINT_FINAL_NORM = True
"""Install ``_CheckpointedNorm`` on the model's final norm (registry.final_norm) in graph_layers, unless the
norm is folded (FOLD_FINAL_NORM). On the H200's 8B step (docs/speed.md, session 25) it lowered the graphed step's
allocated peak from 22.30 to 22.23 GiB (eager lorakit: 22.26) at the same speed (0.959-0.965 of the floor vs
0.960-0.967 without it); the recomputation costs one norm's forward per step."""


FOLD_FINAL_NORM = False
"""Fold the model's final norm (registry.final_norm) into a checkpointed last layer's graphs, read by
graph_layers, as a checkpoint of its own: the backward recomputes the norm from its bf16 input instead of
keeping what it saved (Llama's RMSNorm keeps its input in fp32: 64 MiB against 32 on the 8B shape). Off: on the
H200's 8B step it lowered the allocated peak by 0.03 GiB but raised the graph pool's reserved memory by 0.11 GiB
and the whole reserved peak by 0.3-0.4 (docs/speed.md, session 21), so the memory a step really holds did not drop."""


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, graphed, pending, hidden, cos, sin, *params):
        cap = graphed.captured
        if cap.inputs[0].data_ptr() != hidden.data_ptr():  # a chained input never differs (GraphedLayer.__call__)
            cap.inputs[0].copy_(hidden)
        for slot, new in zip(cap.rope, (cos, sin)):
            slot.load(new)
        cap.fwd.replay()
        ctx.graphed, ctx.pending, ctx.hidden_grad = graphed, pending, hidden.requires_grad
        return cap.output.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        if ctx.pending.done:
            raise RuntimeError("a graphed decoder layer's backward ran twice for one forward (retain_graph=True); "
                               "graphed layers keep one step's activations: call lk.ungraph_layers(model) first")
        ctx.pending.done = True
        cap = ctx.graphed.captured
        if cap is None:
            raise RuntimeError("lk.ungraph_layers ran between a graphed decoder layer's forward and its backward; "
                               "run the backward first")
        if cap.grad_output.data_ptr() != grad_out.data_ptr():
            cap.grad_output.copy_(grad_out)
        cap.bwd.replay()
        grads = list(cap.grads)
        hidden_grad = grads.pop(0) if ctx.hidden_grad else None
        # copies, made before the next layer's replay writes the shared buffers (same stream); a stolen alias of
        # a buffer would be overwritten, not added to, by that replay
        param_grads = [None if g is None else g.clone() for g in grads]
        return (None, None, hidden_grad, None, None, *param_grads)


def _lora_state(module: nn.Module) -> tuple:
    return tuple((tuple(m.active.items()), tuple(m.merged.items()), m.disabled, m.mixed is None,
                  getattr(m, "use_fused_kernel", None))
                 for m in module.modules() if isinstance(m, LoraLayer))


@contextlib.contextmanager
def _no_autocast_cache():
    """Captures under autocast with its weight cache off (as torch.cuda.make_graphed_callables needs): the
    casts then are kernels of the graph, redone at every replay, and no cached cast outlives the capture in the
    graphs' pool. Without autocast, nothing changes."""
    if not torch.is_autocast_enabled("cuda"):
        yield
        return
    with torch.autocast("cuda", dtype=torch.get_autocast_dtype("cuda"), cache_enabled=False):
        yield


@contextlib.contextmanager
def _fresh_leaves(layer: nn.Module):
    """The layer's trainable parameters replaced, in their modules, by new leaf Parameters on the same storage
    (and version counter) for the capture; yields {id(original): alias}. Why: autograd keeps one gradient
    accumulator node per leaf, made on the stream of its first use; a training loop that still holds the last
    step's graph (``loss`` not yet reassigned) keeps the originals' nodes, made on the default stream, and the
    captured backward would then have to wait on that stream, which a capture cannot. The replay hands the
    gradients to the originals outside the capture."""
    aliases: dict[int, nn.Parameter] = {}
    swapped = []
    for module in layer.modules():
        for name, p in module._parameters.items():
            if p is not None and p.requires_grad:
                alias = aliases.setdefault(id(p), nn.Parameter(p.detach(), requires_grad=True))
                swapped.append((module, name, p))
                module._parameters[name] = alias
    try:
        yield aliases
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


WORKSPACE_IN_POOL = True
"""Clear cuBLAS's cached workspaces around each capture (``_workspace_in_pool``): 64 MiB less on the H200
(bench/graph_memory.py). The clearing is global, as in torch.compile's CUDA graph trees: turn it off where a
CUDA graph captured elsewhere, by hand, still relies on a workspace cached outside a graph pool."""


@contextlib.contextmanager
def _workspace_in_pool():
    """cuBLAS keeps a workspace per stream (on Hopper 32 MiB, for cuBLAS and cuBLASLt each), so the capture
    stream's would stay allocated for good beside the default stream's. Cleared before the capture, the capture
    allocates its own in the graphs' pool; cleared after it, that becomes a free block of the pool, which the
    graph uses at its replays like its other temporaries (as torch.compile's CUDA graph trees do). Other
    streams' workspaces are made again at their next use."""
    if WORKSPACE_IN_POOL:
        torch._C._cuda_clearCublasWorkspaces()
    try:
        yield
    finally:
        if WORKSPACE_IN_POOL:
            torch._C._cuda_clearCublasWorkspaces()


def _has_dropout(module: nn.Module) -> bool:
    return any((isinstance(m, nn.Dropout) and m.p > 0) or getattr(m, "attention_dropout", 0) > 0
               for m in module.modules())


class GraphedLayer:
    """Installed as ``layer.forward``: replays the layer's captured graphs where it can, else runs the layer's
    own forward."""

    def __init__(self, layer: nn.Module, shared: _Shared, warmup: int):
        self.layer = layer
        self.layer_forward = type(layer).forward.__get__(layer)  # the class's own, under this instance attribute
        self.shared = shared
        self.warmup = warmup
        self.calls = 0
        self.checkpoint = bool(getattr(layer, "gradient_checkpointing", False))
        self.checkpoint_func = getattr(layer, "_gradient_checkpointing_func", None)
        layer.gradient_checkpointing = False  # this wrapper checkpoints (or graphs) the layer itself
        self.captured: _Captured | None = None
        self.pending = _dead  # weakref to the _Pending of the last replay
        self.replays = 0
        self.last = False  # the model's last graphed layer (graph_layers sets it)
        self.fold: _FoldedNorm | None = None  # the final norm folded into this (last, checkpointed) layer's graphs
        self.final_norm: _FinalNorm | None = None  # the final norm's installed forward (the fold or a checkpoint)
        self.norm_input: torch.Tensor | None = None  # the folded norm's input, which its checkpoint saves
        self.eager_calls: collections.Counter[str] = collections.Counter()  # why calls ran eagerly

    def eager_forward(self, *args, **kwargs):
        forward = self.layer_forward
        if self.checkpoint and self.layer.training and torch.is_grad_enabled():
            func = self.checkpoint_func or (lambda f, *a: torch.utils.checkpoint.checkpoint(f, *a, use_reentrant=False))
            return func(lambda *a: forward(*a, **kwargs), *args)
        return forward(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        inputs, why = self._graph_inputs(args, kwargs)
        if inputs is None:
            return self._eager(why, args, kwargs)
        key = self._key(inputs)
        if self.captured is None:
            self.calls += 1
            if self.calls <= self.warmup:  # lazy state first (e.g. the fused blocks widen their weights)
                return self._eager("warm-up before the capture", args, kwargs)
            if not self.shared.rope_loadable(self.shared.rope_slots(*inputs[1:]), inputs[1:]):
                return self._eager(_OTHER_ROPE, args, kwargs)
            if self.shared.captured_after(self):
                return self._eager(_OUT_OF_ORDER, args, kwargs)
            self.captured = self._capture(inputs, key)
        pending = self.pending()
        cap = self.captured
        why = ("not the captured shapes, parameters, LoRA state or autocast state" if cap.key != key else
               "the previous forward's backward has not run" if pending is not None and not pending.done else
               "the input is not the previous graphed layer's output"
               if cap.chained and inputs[0].data_ptr() != cap.inputs[0].data_ptr() else
               _OTHER_ROPE if not self.shared.rope_loadable(cap.rope, inputs[1:]) else None)
        if why:
            return self._eager(why, args, kwargs)
        token = _Pending()
        self.pending = weakref.ref(token)
        self.replays += 1
        out = _Replay.apply(self, token, *inputs, *self.captured.params)
        if self.final_norm is not None:
            self.final_norm.output = weakref.ref(out)
        return out

    def _eager(self, why: str, args, kwargs):
        self.eager_calls[why] += 1
        feed = self.shared.feed
        if (feed is not None and self.captured is not None and feed.static is self.captured.inputs[0] and args
                and isinstance(args[0], torch.Tensor) and args[0].data_ptr() == feed.static.data_ptr()):
            args = (args[0].clone(), *args[1:])  # the next forward's embedding output is written into the static
        return self.eager_forward(*args, **kwargs)

    # ------------------------------------------------------------------ when a call can be graphed
    def _graph_inputs(self, args, kwargs) -> tuple[tuple[torch.Tensor, ...] | None, str]:
        """The tensors a graphed call reads, or None and why the call runs eagerly."""
        layer = self.layer
        if not (layer.training and torch.is_grad_enabled()):
            return None, "not training with grad enabled"
        extra = sorted(k for k in kwargs if k not in _ALLOWED_KWARGS and not (k in _OFF_FLAGS and not kwargs[k]))
        if len(args) != 1 or extra:
            return None, f"other arguments ({len(args)} positional; keywords {extra})"
        hidden = args[0]
        embeddings = kwargs.get("position_embeddings")
        if not isinstance(hidden, torch.Tensor) or not hidden.is_cuda:
            return None, "hidden states not a CUDA tensor"
        if kwargs.get("attention_mask") is not None:
            return None, "an attention mask (padding: pack the batches instead)"
        if kwargs.get("use_cache") or any(kwargs.get(k) is not None for k in ("cache", "past_key_values",
                                                                             "past_key_value")):
            return None, "a KV cache"
        if not isinstance(embeddings, tuple) or len(embeddings) != 2:
            return None, "no (cos, sin) position embeddings"
        if torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing():
            return None, "inside torch.compile or another capture"
        if self.checkpoint and _has_dropout(layer):
            return None, "dropout in a checkpointed layer"
        if self.fold is not None and (_has_hooks(layer) or _has_hooks(self.fold.norm)):
            return None, "hooks on the last layer or the final norm, which its graphs hold"
        return (hidden, *embeddings), ""

    def _key(self, inputs) -> tuple:
        layer = self.layer
        params = list(layer.parameters()) + (list(self.fold.norm.parameters()) if self.fold is not None else [])
        return (tuple((t.shape, t.dtype, t.device, t.requires_grad) for t in inputs),
                tuple((p.data_ptr(), p.requires_grad) for p in params),
                _lora_state(layer), torch.is_autocast_enabled("cuda"))

    # ------------------------------------------------------------------ capture
    def _run(self, hidden, cos, sin):
        out = self.layer_forward(hidden, attention_mask=None, position_embeddings=(cos, sin))
        if not isinstance(out, torch.Tensor):
            raise ConfigError(f"{type(self.layer).__name__}.forward returned {type(out).__name__}, not a tensor: "
                              "graph_layers needs transformers >= 5 (decoder layers that return the hidden states)")
        return out

    def _capture(self, inputs, key) -> _Captured:
        hidden, cos, sin = inputs
        shared = self.shared
        previous = shared.outputs.get(hidden.data_ptr())
        chained = (previous is not None and previous.shape == hidden.shape and previous.dtype == hidden.dtype
                   and previous.stride() == hidden.stride())
        static_hidden = previous.detach() if chained else hidden.detach().clone()
        feed = shared.feed
        if not chained and feed is not None and feed.static is None and feed.last() is hidden:
            feed.static = static_hidden  # the embedding writes its output here from the next forward on
        rope = shared.rope_slots(cos, sin)
        for slot, new in zip(rope, (cos, sin)):
            slot.load(new)
        static = (static_hidden.requires_grad_(hidden.requires_grad), rope[0].static, rope[1].static)
        params = tuple(p for p in self.layer.parameters() if p.requires_grad)
        with _no_autocast_cache(), _fresh_leaves(self.layer) as aliases:
            return self._capture_with(static, rope, chained, hidden.requires_grad, key, params,
                                      tuple(aliases[id(p)] for p in params))

    def _capture_with(self, static, rope, chained: bool, hidden_grad: bool, key, params, aliases) -> _Captured:
        shared = self.shared
        wrt = ((static[0],) if hidden_grad else ()) + aliases
        if not wrt:
            raise ConfigError("graph_layers: the layer has no trainable parameter and its input needs no grad")
        if shared.stream is None:
            shared.stream = torch.cuda.Stream()
        stream = shared.stream
        stream.wait_stream(torch.cuda.current_stream())
        # the capture stream's lazy state (cuBLAS workspace, ...) first, once per model: a warm-up per layer
        # adds that layer's activations and temporaries to the capturing step's peak, for every layer
        with torch.cuda.stream(stream):
            for _ in range(0 if shared.warmed else 2):
                out = self._forward(static)
                torch.autograd.grad(out, wrt, torch.ones_like(out), allow_unused=True)
                del out
        shared.warmed = True
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        fwd, bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        # a checkpointed last layer leaves its output in the input-gradient buffer: nothing after the layer reads
        # that output once the backward reaches the layer (the checkpoint recomputes from the layer's input), and
        # the buffer is read only from then on; so the graphs hold one hidden-sized tensor less
        into_buffer = shared.buffer(static[0]) if self.checkpoint and self.last else None
        with _workspace_in_pool(), torch.cuda.graph(fwd, pool=shared.pool, stream=stream,
                                                    capture_error_mode="thread_local"):
            output = self._forward(static)
            if into_buffer is not None and (output.shape, output.dtype) == (into_buffer.shape, into_buffer.dtype):
                into_buffer.copy_(output.detach())
            else:
                into_buffer = None
        grad_buffer = shared.buffer(output)
        ranks: collections.Counter = collections.Counter()
        param_buffers = []
        for p in aliases:  # each parameter's gradient buffer, shared with the other layers' of the same shape
            param_buffers.append(shared.buffer(p, ("param", ranks[(p.shape, p.dtype)])))
            ranks[(p.shape, p.dtype)] += 1
        if hidden_grad and grad_buffer.shape != static[0].shape:
            raise ConfigError(f"graph_layers: {type(self.layer).__name__} maps hidden states of shape "
                              f"{tuple(static[0].shape)} to {tuple(output.shape)}; graphed layers keep the shape")
        with _workspace_in_pool(), torch.cuda.graph(bwd, pool=shared.pool, stream=stream,
                                                    capture_error_mode="thread_local"):
            # checkpointed: the forward saved only its inputs (static), so nothing needs to outlive the capture;
            # else the saved activations must stay allocated for every replay
            grads = list(torch.autograd.grad(output, wrt, grad_buffer, allow_unused=True,
                                             retain_graph=not self.checkpoint))
            if hidden_grad:  # read above, so it can be overwritten now: the previous layer's grad_output
                grad_buffer.copy_(grads[0])
                grads[0] = grad_buffer
            for i, buffer in enumerate(param_buffers, start=int(hidden_grad)):
                if grads[i] is not None:
                    grads[i] = buffer.copy_(grads[i])
        torch.cuda.synchronize()
        if into_buffer is not None:  # not registered for chaining: a layer reading it would overwrite its input
            static_output = into_buffer.detach()
        else:
            static_output = shared.outputs[output.data_ptr()] = output.detach()
        return _Captured(key=key, fwd=fwd, bwd=bwd, inputs=static, rope=rope, chained=chained, output=static_output,
                         grad_output=grad_buffer, grads=tuple(grads), params=params,
                         keep_alive=output if not self.checkpoint else self.norm_input)

    def _forward(self, static):
        if not self.checkpoint:
            return self._run(*static)
        # torch's non-reentrant checkpoint: its recompute in backward stops after the last tensor backward needs
        # (a frozen last projection's GEMM is not redone); no RNG state to restore, as no dropout is allowed here
        out = torch.utils.checkpoint.checkpoint(self._run, *static, use_reentrant=False, preserve_rng_state=False)
        if self.fold is None:
            return out
        # the folded norm as a checkpoint of its own, whose input is kept: the backward recomputes and
        # differentiates the norm before it recomputes the layer, so the norm's fp32 temporaries and the layer's
        # activations need not coexist (on 8B the reserved peak was no lower than with one checkpoint: docs/speed.md)
        self.norm_input = out.detach()
        return torch.utils.checkpoint.checkpoint(self.fold.norm_forward, out, use_reentrant=False,
                                                 preserve_rng_state=False)


def graph_layers(model: nn.Module, warmup: int = 2) -> int:
    """Replay the decoder layers of a known Hugging Face causal LM (registry.decoder_layers) as CUDA graphs in
    training steps; returns how many layers are graphed. Each layer runs ``warmup`` eager training calls before
    it captures. Undo with ``ungraph_layers``."""
    if warmup < 1:
        raise ConfigError(f"warmup must be >= 1 (eager calls before the capture, for lazy state), got {warmup}")
    layers = registry.decoder_layers(model)
    if not layers:
        raise ConfigError(f"no decoder layer of a known class in {type(model).__name__}; graph_layers knows "
                          f"{registry.known_decoder_layers()}")
    if not torch.cuda.is_available() or not any(p.is_cuda for p in model.parameters()):
        raise ConfigError("graph_layers replays CUDA graphs: move the model to a CUDA device first")
    shared = _Shared(pool=torch.cuda.graph_pool_handle())
    count = 0
    for _, layer in layers:
        if isinstance(layer.__dict__.get("forward"), GraphedLayer):
            continue
        layer.forward = GraphedLayer(layer, shared, warmup)
        shared.layers.append(layer.forward)
        count += 1
    if count:
        last = shared.layers[-1]
        last.last = True
        norm = registry.final_norm(model)
        if norm is not None and "forward" not in norm.__dict__ and not _has_hooks(norm):
            if FOLD_FINAL_NORM and last.checkpoint and not any(p.requires_grad for p in norm.parameters()):
                last.final_norm = last.fold = norm.forward = _FoldedNorm(norm)
            elif CHECKPOINT_FINAL_NORM:
                last.final_norm = norm.forward = _CheckpointedNorm(norm)
    embedding = _input_embedding(model)
    if count and embedding is not None:
        shared.feed = _EmbeddingFeed(shared, embedding)
    return count


def _input_embedding(model: nn.Module) -> nn.Module | None:
    """The Hugging Face model's input embedding module, or None."""
    try:
        embedding = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    return embedding if isinstance(embedding, nn.Module) else None


def ungraph_layers(model: nn.Module) -> int:
    """Undo ``graph_layers``: the layers' own forwards (and gradient checkpointing) again; the graphs' memory is
    freed once nothing holds their outputs. Returns how many layers were restored."""
    count = 0
    for layer, graphed in _graphed(model):
        del layer.forward
        layer.gradient_checkpointing = graphed.checkpoint
        graphed.captured = None
        if graphed.final_norm is not None:
            del graphed.final_norm.norm.forward
            graphed.final_norm = graphed.fold = None
        shared = graphed.shared
        for table in (shared.outputs, shared.grad_buffers, shared.rope):
            table.clear()
        shared.layers.clear()
        if shared.feed is not None:
            shared.feed.handle.remove()
            shared.feed = None
        count += 1
    return count


def eager_calls(model: nn.Module) -> dict[str, int]:
    """How many calls of the model's graphed decoder layers ran eagerly, by reason (where a run that should
    replay does not, this says why: a padding mask, another shape, ...)."""
    total: collections.Counter[str] = collections.Counter()
    for _, graphed in _graphed(model):
        total.update(graphed.eager_calls)
    return dict(total)


def graphed_replays(model: nn.Module) -> int:
    """How many graphed calls the model's decoder layers have replayed (a run can check it is not eager)."""
    return sum(graphed.replays for _, graphed in _graphed(model))


def _graphed(model: nn.Module) -> list[tuple[nn.Module, GraphedLayer]]:
    """(layer, its GraphedLayer) for the model's decoder layers that graph_layers graphed."""
    return [(layer, f) for _, layer in registry.decoder_layers(model)
            if isinstance(f := layer.__dict__.get("forward"), GraphedLayer)]
