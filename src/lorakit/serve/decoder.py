"""The serving forward pass: a Llama-family decoder with a slot KV cache and one LoRA adapter per batch row.

Hugging Face's ``generate`` keeps one cache per batch and every row at the same position, so a new request
cannot join a running batch. This module reads the weights of a Hugging Face model (Llama, Mistral, Qwen2,
Qwen3 layouts) and runs its own forward over a static cache of ``max_batch`` slots, each row at its own
position:

    prefill(prompts, slots, adapters)  fills the cache of the given slots, returns each prompt's last logits
    decode(tokens, positions, adapters) one token for rows 0..B-1 (row = cache slot), returns logits

Base projections are fused (q|k|v and gate|up, one matmul each; the Hugging Face modules keep views into
the fused weights, so no memory is doubled). A base whose projections are packed 4/8-bit layers
(``lorakit.load_quantized``: QLoRA adapters served over the very weights they were trained on) keeps them
packed: each group runs its modules one by one (dequantize + GEMM, or the 4-bit GEMV for a few rows) and
concatenates the outputs. Each fused group has one LoRA stack (see bgmv.py) and every row
adds its own adapter through the gathered low-rank matmul. Rows that are not running write their K/V to a
scratch position past ``max_len`` that attention never reads. On CUDA, decode steps replay CUDA graphs
captured per (batch bucket, length bucket, adapters on/off).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from .bgmv import lora_apply_

SUPPORTED_TYPES = ("llama", "mistral", "qwen2", "qwen3")
"""model_type values whose decoder layout this forward reproduces."""

GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("qkv", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    ("o", ("self_attn.o_proj",)),
    ("gate_up", ("mlp.gate_proj", "mlp.up_proj")),
    ("down", ("mlp.down_proj",)),
)
"""Fused projection groups of a decoder layer and the module suffixes (in output order) inside each."""


@dataclass(frozen=True)
class Target:
    """One projection an adapter may carry: where its LoRA lives in the stacks."""

    layer: int
    group: str
    slice: int
    in_features: int
    out_features: int


@dataclass
class LoraStack:
    """The adapters of one fused group of one layer, one slot per adapter (slot 0: zeros, the base)."""

    A: torch.Tensor  # (n_slots, S * R, in)
    B: torch.Tensor  # (n_slots, N, R)
    scales: torch.Tensor  # (n_slots, S) fp32
    bounds: tuple[int, ...]  # end column of each slice in the group's output
    starts: tuple[int, ...] = field(default=())


@dataclass
class _Projection:
    """One projection group of a layer: a dense (fused) weight and bias run as one GEMM, or packed 4/8-bit
    modules run one by one, their outputs concatenated (each dequantizes to the input's dtype itself)."""

    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    packed: tuple[nn.Module, ...] = ()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            return F.linear(x, self.weight, self.bias)
        outs = [m(x) for m in self.packed]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


@dataclass
class _Layer:
    in_norm: nn.Module
    post_norm: nn.Module
    qkv: _Projection
    o: _Projection
    gate_up: _Projection
    down: _Projection
    q_norm: nn.Module | None
    k_norm: nn.Module | None


@dataclass
class _Graph:
    graph: object
    tokens: torch.Tensor
    positions: torch.Tensor
    idx: torch.Tensor
    logits: torch.Tensor


def _bucket(n: int, top: int, smallest: int = 1) -> int:
    b = smallest
    while b < n:
        b *= 2
    return min(b, top)


def _projection(modules: list[nn.Module]) -> _Projection:
    """Dense modules fused into one weight; packed (4/8-bit) ones kept as they are."""
    from ..layers.quantized import FrozenPackedLinear

    packed = [isinstance(m, FrozenPackedLinear) for m in modules]
    if any(packed):
        if not all(packed):
            kinds = [type(m).__name__ for m in modules]
            raise ConfigError(f"a projection group mixes packed and dense layers ({kinds}): quantize all of "
                              "q/k/v (and gate/up) or none")
        return _Projection(packed=tuple(modules))
    weight, bias = _fuse(modules)
    return _Projection(weight, bias)


def _fuse(modules: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) for several projections; the modules keep views into it (no doubled memory)."""
    weight = torch.cat([m.weight.detach() for m in modules], dim=0)
    biases = [m.bias for m in modules]
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([b.detach() if b is not None else weight.new_zeros(m.out_features)
                          for m, b in zip(modules, biases)])
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight[start:start + n], requires_grad=False)
        if m.bias is not None:
            m.bias = nn.Parameter(bias[start:start + n], requires_grad=False)
        start += n
    return weight, bias


class Decoder:
    """Prefill and decode over a Hugging Face Llama-family causal LM, with per-row LoRA adapters.

    Args:
        model: a ``*ForCausalLM`` of a supported type, in eval mode, with no lorakit adapters injected.
            The decoder owns it from now on (its q/k/v and gate/up weights become views of fused tensors).
        max_batch: rows (= KV cache slots) decoded together.
        max_len: longest sequence (prompt + generated) a slot holds.
        adapter_slots: adapters that can sit in the stacks at once (slot 0, the base, comes on top).
        max_rank: the largest LoRA rank the stacks hold (smaller ranks are zero-padded, exactly).
        cuda_graphs: replay CUDA graphs for decode steps on CUDA (no effect elsewhere).
    """

    def __init__(self, model: nn.Module, max_batch: int, max_len: int, adapter_slots: int, max_rank: int,
                 cuda_graphs: bool = True):
        config = model.config
        if config.model_type not in SUPPORTED_TYPES:
            raise ConfigError(f"lorakit serve runs decoders of type {', '.join(SUPPORTED_TYPES)}; this model is "
                              f"model_type={config.model_type!r}")
        for name, value in (("max_batch", max_batch), ("max_len", max_len), ("max_rank", max_rank)):
            if value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        window = getattr(config, "sliding_window", None)
        if window and getattr(config, "use_sliding_window", True) and window < max_len:
            raise ConfigError(f"max_len {max_len} exceeds the model's sliding window {window}: lorakit serve does "
                              "not implement sliding-window attention; lower max_len")
        self.model = model.eval()
        self.config = config
        backbone = model.model
        first = backbone.layers[0]
        param = backbone.embed_tokens.weight  # (a packed base's projections hold integer codes, not this dtype)
        self.device, self.dtype = param.device, param.dtype
        self.max_batch, self.max_len, self.max_rank = max_batch, max_len, max_rank
        self.n_slots = adapter_slots + 1
        self.n_heads = config.num_attention_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.n_kv = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.scaling = float(getattr(first.self_attn, "scaling", self.head_dim ** -0.5))
        self.act = first.mlp.act_fn
        self.embed = backbone.embed_tokens
        self.norm = backbone.norm
        self.rotary = backbone.rotary_emb
        self.lm_head = model.lm_head.weight
        self.vocab_size = self.lm_head.shape[0]
        self.qkv_sizes = (self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)
        self.intermediate = first.mlp.gate_proj.out_features

        self.layers: list[_Layer] = []
        self.targets: dict[str, Target] = {}
        self.stacks: list[dict[str, LoraStack]] = []
        with torch.no_grad():
            for i, layer in enumerate(backbone.layers):
                attn, mlp = layer.self_attn, layer.mlp
                self.layers.append(_Layer(
                    layer.input_layernorm, layer.post_attention_layernorm,
                    _projection([attn.q_proj, attn.k_proj, attn.v_proj]), _projection([attn.o_proj]),
                    _projection([mlp.gate_proj, mlp.up_proj]), _projection([mlp.down_proj]),
                    getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)))
                stacks = {}
                for group, suffixes in GROUPS:
                    mods = [layer.get_submodule(s) for s in suffixes]
                    outs = [m.out_features for m in mods]
                    for s, (suffix, m) in enumerate(zip(suffixes, mods)):
                        self.targets[f"model.layers.{i}.{suffix}"] = Target(i, group, s, m.in_features,
                                                                            m.out_features)
                    bounds = tuple(sum(outs[:k + 1]) for k in range(len(outs)))
                    stacks[group] = LoraStack(
                        A=torch.zeros(self.n_slots, len(mods) * max_rank, mods[0].in_features, dtype=self.dtype,
                                      device=self.device),
                        B=torch.zeros(self.n_slots, bounds[-1], max_rank, dtype=self.dtype, device=self.device),
                        scales=torch.zeros(self.n_slots, len(mods), dtype=torch.float32, device=self.device),
                        bounds=bounds, starts=(0,) + bounds[:-1])
                self.stacks.append(stacks)

        shape = (max_batch, self.n_kv, max_len + 1, self.head_dim)  # + 1: the scratch position
        self.k_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.v_cache = [torch.zeros(shape, dtype=self.dtype, device=self.device) for _ in self.layers]
        self.scratch = max_len
        self._rows = torch.arange(max_batch, device=self.device)
        self._positions = torch.arange(max_len + 1, device=self.device)
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self._graphs: dict[tuple[int, int, bool], _Graph] = {}
        self._pool = None

    # ------------------------------------------------------------------------------------ sizes
    def kv_cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k_cache + self.v_cache)

    def adapter_slot_bytes(self) -> int:
        """Memory one adapter slot takes in the stacks (what --max-adapters-gpu multiplies)."""
        total = 0
        for stacks in self.stacks:
            for st in stacks.values():
                total += (st.A[0].numel() + st.B[0].numel()) * st.A.element_size() + st.scales[0].numel() * 4
        return total

    # ------------------------------------------------------------------------------------ adapters
    def write_adapter(self, slot: int, groups: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor,
                                                                           torch.Tensor]]) -> None:
        """Put an adapter into stack slot ``slot`` (>= 1). ``groups[(layer, group)] = (A, B, scales)`` with
        the stack's padded shapes; groups absent from the dict are zeroed (the adapter does not touch them)."""
        if not 1 <= slot < self.n_slots:
            raise ValueError(f"adapter slot {slot} out of range 1..{self.n_slots - 1}")
        with torch.no_grad():
            for i, stacks in enumerate(self.stacks):
                for group, st in stacks.items():
                    parts = groups.get((i, group))
                    if parts is None:
                        st.A[slot].zero_()
                        st.B[slot].zero_()
                        st.scales[slot].zero_()
                    else:
                        A, B, scales = parts
                        st.A[slot].copy_(A, non_blocking=True)
                        st.B[slot].copy_(B, non_blocking=True)
                        st.scales[slot].copy_(scales, non_blocking=True)

    def clear_adapter(self, slot: int) -> None:
        self.write_adapter(slot, {})

    # ------------------------------------------------------------------------------------ forward parts
    def _lora(self, layer: int, group: str, inp: torch.Tensor, out: torch.Tensor, idx: torch.Tensor) -> None:
        st = self.stacks[layer][group]
        lora_apply_(out, inp, st.A, st.B, st.scales, idx, st.bounds)

    @staticmethod
    def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    def _layer(self, i: int, x: torch.Tensor, cos, sin, idx: torch.Tensor | None, attend) -> torch.Tensor:
        w = self.layers[i]
        B, T = x.shape[:2]
        h = w.in_norm(x)
        qkv = w.qkv(h)
        if idx is not None:
            self._lora(i, "qkv", h, qkv, idx)
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim)
        k = k.view(B, T, self.n_kv, self.head_dim)
        v = v.view(B, T, self.n_kv, self.head_dim)
        if w.q_norm is not None:
            q, k = w.q_norm(q), w.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = self._rope(q, cos, sin), self._rope(k, cos, sin)
        o = attend(i, q, k, v)  # (B, heads, T, head_dim)
        o = o.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)
        out = w.o(o)
        if idx is not None:
            self._lora(i, "o", o, out, idx)
        x = x + out
        h = w.post_norm(x)
        gu = w.gate_up(h)
        if idx is not None:
            self._lora(i, "gate_up", h, gu, idx)
        gate, up = gu.split(self.intermediate, dim=-1)
        a = self.act(gate) * up
        down = w.down(a)
        if idx is not None:
            self._lora(i, "down", a, down, idx)
        return x + down

    def _cos_sin(self, x: torch.Tensor, position_ids: torch.Tensor):
        cos, sin = self.rotary(x, position_ids)
        return cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, head_dim): broadcast over heads

    # ------------------------------------------------------------------------------------ prefill
    @torch.no_grad()
    def prefill(self, prompts: list[list[int]], slots: list[int], adapter_slots: list[int]) -> torch.Tensor:
        """Run the prompts (right-padded into one batch), fill their cache slots from position 0, and return
        the logits after each prompt's last token: (len(prompts), vocab) in fp32."""
        lengths = [len(p) for p in prompts]
        T = max(lengths)
        if min(lengths) < 1 or T > self.max_len:
            raise ValueError(f"prompt lengths must be in 1..{self.max_len}, got {min(lengths)}..{T}")
        tokens = torch.zeros(len(prompts), T, dtype=torch.long)
        for row, p in enumerate(prompts):
            tokens[row, :len(p)] = torch.tensor(p, dtype=torch.long)
        tokens = tokens.to(self.device)
        idx = torch.tensor(adapter_slots, dtype=torch.long, device=self.device)
        use_idx = idx if any(adapter_slots) else None
        x = self.embed(tokens)
        position_ids = self._positions[:T].unsqueeze(0).expand(len(prompts), T)
        cos, sin = self._cos_sin(x, position_ids)

        def attend(i, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            for row, slot in enumerate(slots):
                kc[slot, :, :T].copy_(k[row])
                vc[slot, :, :T].copy_(v[row])
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scaling,
                                                  enable_gqa=self.n_kv != self.n_heads)

        for i in range(len(self.layers)):
            x = self._layer(i, x, cos, sin, use_idx, attend)
        last = torch.tensor([n - 1 for n in lengths], device=self.device)
        h = self.norm(x[torch.arange(len(prompts), device=self.device), last])
        return F.linear(h, self.lm_head).float()

    # ------------------------------------------------------------------------------------ decode
    def _decode_eager(self, tokens: torch.Tensor, positions: torch.Tensor, idx: torch.Tensor | None,
                      length: int) -> torch.Tensor:
        B = tokens.shape[0]
        x = self.embed(tokens.unsqueeze(1))  # (B, 1, hidden)
        cos, sin = self._cos_sin(x, positions.unsqueeze(1))
        visible = self._positions[:length].unsqueeze(0) <= positions.unsqueeze(1)  # (B, L)
        bias = torch.zeros(B, 1, 1, length, dtype=torch.float32, device=self.device)
        bias.masked_fill_(~visible[:, None, None, :], float("-inf"))
        rows = self._rows[:B]
        groups = self.n_heads // self.n_kv

        def attend(i, q, k, v):
            kc, vc = self.k_cache[i], self.v_cache[i]
            kc[rows, :, positions] = k[:, :, 0]
            vc[rows, :, positions] = v[:, :, 0]
            keys, values = kc[:B, :, :length], vc[:B, :, :length]  # (B, kv, L, d): views, no copy
            qg = q.reshape(B, self.n_kv, groups, self.head_dim)
            scores = torch.matmul(qg, keys.transpose(-1, -2)).float() * self.scaling + bias
            probs = torch.softmax(scores, dim=-1).to(values.dtype)
            return torch.matmul(probs, values).reshape(B, self.n_heads, 1, self.head_dim)

        for i in range(len(self.layers)):
            x = self._layer(i, x, cos, sin, idx, attend)
        return F.linear(self.norm(x[:, 0]), self.lm_head)

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, adapter_idx: torch.Tensor,
               active: torch.Tensor | None = None) -> torch.Tensor:
        """One decode step for cache slots 0..B-1: row b feeds ``tokens[b]`` at ``positions[b]`` with
        adapter slot ``adapter_idx[b]``. Rows where ``active`` is False write only to the scratch position.
        Returns (B, vocab) logits in fp32."""
        B = tokens.shape[0]
        positions, idx = positions.cpu(), adapter_idx.cpu()
        if active is not None:
            active = active.cpu()
            positions = torch.where(active, positions, torch.full_like(positions, self.scratch))
            idx = torch.where(active, idx, torch.zeros_like(idx))
        real = positions[positions != self.scratch]
        longest = int(real.max()) + 1 if real.numel() else 1
        use_lora = bool((idx != 0).any())
        tokens, positions, idx = (t.to(self.device, non_blocking=True) for t in (tokens, positions, idx))
        if not self.cuda_graphs:
            return self._decode_eager(tokens, positions, idx if use_lora else None, longest).float()
        Bb = _bucket(B, self.max_batch)
        Lb = _bucket(longest, self.max_len, smallest=min(64, self.max_len))
        graph = self._graphs.get((Bb, Lb, use_lora)) or self._capture(Bb, Lb, use_lora)
        graph.tokens.zero_()
        graph.positions.fill_(self.scratch)
        graph.idx.zero_()
        graph.tokens[:B].copy_(tokens)
        graph.positions[:B].copy_(positions)
        graph.idx[:B].copy_(idx)
        graph.graph.replay()
        return graph.logits[:B].float()

    def _capture(self, Bb: int, Lb: int, use_lora: bool) -> _Graph:
        tokens = torch.zeros(Bb, dtype=torch.long, device=self.device)
        positions = torch.full((Bb,), self.scratch, dtype=torch.long, device=self.device)  # warm-up: scratch only
        idx = torch.zeros(Bb, dtype=torch.long, device=self.device)
        run_idx = idx if use_lora else None
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):  # compiles the Triton kernels and settles the allocator before capture
                self._decode_eager(tokens, positions, run_idx, Lb)
        torch.cuda.current_stream().wait_stream(stream)
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: adapter loads on other threads (pin_memory) may run while this thread captures
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            logits = self._decode_eager(tokens, positions, run_idx, Lb)
        captured = _Graph(graph, tokens, positions, idx, logits)
        self._graphs[(Bb, Lb, use_lora)] = captured
        return captured


def check_model(model: nn.Module) -> None:
    """Raise ConfigError unless ``model`` is a causal LM whose layout the Decoder reads."""
    config = getattr(model, "config", None)
    if config is None or getattr(config, "model_type", None) not in SUPPORTED_TYPES:
        found = getattr(config, "model_type", type(model).__name__)
        raise ConfigError(f"lorakit serve runs decoders of type {', '.join(SUPPORTED_TYPES)}; got {found!r}")
    if not hasattr(model, "lm_head") or not hasattr(getattr(model, "model", None), "layers"):
        raise ConfigError(f"{type(model).__name__} has no .model.layers / .lm_head: not a supported causal LM")
    from ..layers.quantized import FrozenPackedLinear

    if any(type(m).__module__.startswith("lorakit.") and not isinstance(m, FrozenPackedLinear)
           for m in model.modules()):
        raise ConfigError("the served base model must have no lorakit adapters injected: adapters are served "
                          "from their folders")


__all__ = ["GROUPS", "SUPPORTED_TYPES", "Decoder", "LoraStack", "Target", "check_model"]
