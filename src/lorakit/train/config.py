"""TrainConfig: every setting of a training run in one dataclass, read top to bottom.

Values come from three layers, later ones winning: the defaults below, a TOML file (``--config run.toml``,
flat ``key = value`` lines named like the fields), and command-line flags (``--lr 1e-4``). The string under
each field is its documentation; the CLI turns it into the flag's ``--help`` text, so the two never drift.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import itertools
import math
import re
import tomllib
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError

METHODS = ("lora", "qlora", "full", "peft-lora", "prefix")
TASKS = ("auto", "causal-lm", "classification")
DTYPES = ("fp32", "bf16", "fp16")
QUANT_TYPES = ("nf4", "fp4", "int8")
AUTOCAST = ("auto", "none", "bf16", "fp16")
CHAT_LOSS = ("assistant", "all")


@dataclass
class TrainConfig:
    """One training run. See the string under each field."""

    # ----------------------------------------------------------------- what to train
    model: str = ""
    """Hugging Face model directory (config.json, weights, tokenizer). Causal LM or sequence classifier."""
    model_config: str = ""
    """Instead of --model: build a random-weight model from a preset (llama-1b, smollm2-135m, llama-tiny,
    gpt2-tiny, bert-tiny). Without --tokenizer the data must be synthetic (see lorakit compare)."""
    tokenizer: str = ""
    """Tokenizer directory; default: the model directory."""
    task: str = "auto"
    """causal-lm, classification, or auto (from the model's config.json architectures)."""
    method: str = "lora"
    """lora (adapters on a frozen base), qlora (adapters on a 4-bit NF4 base), full (every weight trains),
    or peft-lora (the same adapter through Hugging Face PEFT, for comparisons)."""

    # ----------------------------------------------------------------- data
    data: str = ""
    """Training data: .jsonl/.json (text | prompt+completion | chat messages | text+label), .txt or .csv."""
    eval_data: str = ""
    """Evaluation data file; default: hold out eval_fraction of --data (split before packing)."""
    eval_fraction: float = 0.1
    """Share of --data held out for evaluation when --eval-data is not given (0 disables evaluation)."""
    seq_len: int = 0
    """Tokens per training sequence (0: the model's position limit, at most 2048); longer examples are
    truncated (and counted) unless --packing."""
    packing: bool = False
    """Concatenate examples (each ending in EOS) and cut the stream into full seq_len blocks: no padding,
    no truncation. Attention crosses example boundaries inside a block, as in Hugging Face's group_texts."""
    text_column: str = "text"
    """Field/column holding plain text (causal LM) or the input text (classification)."""
    prompt_column: str = "prompt"
    """Field/column holding the prompt; the loss is computed on the completion only."""
    completion_column: str = "completion"
    """Field/column holding the completion that follows the prompt."""
    messages_column: str = "messages"
    """Field holding a chat: a list of {"role", "content"} rendered with the tokenizer's chat template."""
    label_column: str = "label"
    """Field/column holding the class label (int or string) for classification."""
    chat_loss: str = "assistant"
    """assistant: loss on the assistant turns of a chat only; all: loss on every token."""

    # ----------------------------------------------------------------- the adapter
    r: int = 8
    """LoRA rank."""
    alpha: float = 16.0
    """LoRA alpha; the update is scaled by alpha / r."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: str = "all-linear"
    """Modules that get LoRA: all-linear, or comma-separated names (q_proj,v_proj), or a regex."""
    use_rslora: bool = False
    """Scale by alpha / sqrt(r) (rank-stabilised LoRA)."""
    use_dora: bool = False
    """DoRA: also train a magnitude per output row of each adapted weight (slower, sometimes better)."""
    init: str = "kaiming"
    """Adapter init: kaiming, gaussian, pissa (A and B from the top singular vectors of each weight, the residual
    stays frozen in the base) or pissa_niter_<N> (randomized SVD with N iterations: much faster)."""
    loraplus_ratio: float = 0.0
    """LoRA+: B trains with lr * ratio, A with lr (the paper uses 16); 0 turns it off."""
    num_virtual_tokens: int = 20
    """prefix only: virtual tokens, i.e. trainable key/value vectors per attention layer."""
    prefix_projection: bool = False
    """prefix only: train the prefix through a two-layer MLP (reparametrization), folded away when saved."""
    quant_type: str = "nf4"
    """qlora only: how the frozen base weights are stored: nf4 or fp4 (4 bits, QLoRA) or int8 (8 bits, one
    scale per row, bitsandbytes' LLM.int8 weight format), through lorakit.quantize_model."""
    double_quant: bool = True
    """qlora only: quantize the per-block scales too (saves ~0.4 bit per weight)."""

    # ----------------------------------------------------------------- optimisation
    lr: float = 2e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    batch_size: int = 4
    """Sequences per micro-batch."""
    grad_accum: int = 1
    """Micro-batches per optimizer step (effective batch = batch_size * grad_accum)."""
    max_steps: int = 0
    """Optimizer steps to run; 0: epochs times the steps in one pass over the data."""
    epochs: int = 1
    """Passes over the training data when max_steps is 0."""
    warmup_steps: int = 0
    """Linear warm-up steps, then cosine decay to min_lr_ratio * lr at the last step."""
    min_lr_ratio: float = 0.0
    """Floor of the cosine decay, as a fraction of lr."""
    max_grad_norm: float = 1.0
    """Clip the global gradient norm to this (0 disables clipping)."""
    seed: int = 0
    """Seed for weight init, adapter init, dropout and data order."""

    # ----------------------------------------------------------------- device and precision
    device: str = "auto"
    """cpu, cuda, cuda:1, or auto (cuda when available)."""
    dtype: str = "fp32"
    """dtype of the base weights: fp32, bf16 or fp16 (adapters stay fp32 unless the base is full-trained)."""
    autocast: str = "auto"
    """Mixed precision: bf16, fp16, none, or auto (bf16 on GPUs that support it, none on CPU)."""
    fused_loss: bool = True
    """Causal LMs: apply the output layer and the cross-entropy together in row chunks, so the (tokens x
    vocabulary) logits are never stored, for the model types lorakit.train.losses lists (Llama, Mistral, Qwen,
    Gemma, Phi, GPT-2, ...; others always form the logits). --no-fused-loss forms them."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, ~30% more time."""
    fast: bool = False
    """Fused kernels for the frozen base where liger-kernel knows the architecture (Llama, Mistral, Qwen2/3,
    Gemma, ...; needs a CUDA GPU and pip install liger-kernel): RMSNorm, RoPE, SwiGLU, and the output layer
    fused with the cross-entropy so the (tokens x vocab) logits are never stored. LoRA layers are untouched."""
    cuda_graphs: bool = False
    """LoRA on a CUDA GPU: replay each decoder layer of a Llama, Mistral or Qwen2/3 model as CUDA graphs
    (lorakit.graph_layers), so the host's kernel launches stop holding the step back. Only steps of one
    shape without padding replay (use --packing); any other step runs eagerly. One process only."""
    distributed: str = "auto"
    """Under torchrun (several processes): ddp (replicated model, only adapter gradients all-reduced), fsdp
    (FSDP2: every weight sharded, the 4-bit base too), none, or auto (ddp). batch_size is the global
    micro-batch, split over the processes, so any number of processes follows the same loss curve."""
    fsdp_shard_embeddings: bool = False
    """fsdp: shard an untied input embedding and output head as units of their own, gathered only around
    their use instead of for the whole step: less memory, slower (Llama-3-8B QLoRA on 2 H200s: -0.75 GiB per
    GPU, +32% step time)."""

    # ----------------------------------------------------------------- logging and checkpoints
    output_dir: str = "lorakit-out"
    """Where the adapter (or model), resolved config, metrics.jsonl, loss.png and checkpoints go."""
    log_every: int = 1
    """Write a metrics line every N optimizer steps."""
    eval_every: int = 0
    """Evaluate every N optimizer steps (0: only at the end)."""
    eval_batches: int = 0
    """Evaluate on at most this many batches (0: the whole eval set)."""
    save_every: int = 100
    """Write a resumable checkpoint every N optimizer steps (0: only at the end)."""
    checkpoints: bool = True
    """Write resumable checkpoints (lorakit compare turns them off and reports their size instead)."""
    keep_checkpoints: int = 2
    """Keep the newest N checkpoints (older ones are deleted after a newer one is complete)."""
    resume: str = ""
    """Continue a killed run: 'latest' (newest checkpoint in output_dir) or a checkpoint directory."""
    progress: bool = True
    """Show a progress bar (loss, tokens/s, ETA, memory) on stderr."""
    plot: bool = True
    """Write loss.png at the end (needs matplotlib; skipped with a note when it is missing)."""

    # ----------------------------------------------------------------- methods
    def validate(self) -> TrainConfig:
        """Check types and ranges; raise ConfigError naming the field, the expected and the found value."""
        for f in fields(self):
            value = getattr(self, f.name)
            setattr(self, f.name, _coerce(f.name, value, _field_type(f)))
        _choice("method", self.method, METHODS)
        _choice("task", self.task, TASKS)
        _choice("dtype", self.dtype, DTYPES)
        _choice("autocast", self.autocast, AUTOCAST)
        _choice("chat_loss", self.chat_loss, CHAT_LOSS)
        _choice("quant_type", self.quant_type, QUANT_TYPES)
        if not re.fullmatch(r"kaiming|gaussian|pissa|pissa_niter_[1-9][0-9]*", self.init):
            raise ConfigError(f"init must be kaiming, gaussian, pissa or pissa_niter_<N>, got {self.init!r}")
        if not (math.isfinite(self.loraplus_ratio) and self.loraplus_ratio >= 0):
            raise ConfigError(f"loraplus_ratio must be a finite number >= 0, got {self.loraplus_ratio}")
        if self.num_virtual_tokens < 1:
            raise ConfigError(f"num_virtual_tokens must be >= 1, got {self.num_virtual_tokens}")
        for name in ("r", "batch_size", "grad_accum", "epochs", "log_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in (
            "seq_len",
            "max_steps",
            "warmup_steps",
            "eval_every",
            "eval_batches",
            "save_every",
            "keep_checkpoints",
        ):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"lr must be a positive number, got {self.lr}")
        if not 0 <= self.eval_fraction < 1:
            raise ConfigError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name in ("alpha", "weight_decay", "max_grad_norm"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number >= 0, got {getattr(self, name)}")
        if self.keep_checkpoints == 0:
            raise ConfigError("keep_checkpoints must be >= 1 (the newest checkpoint is what --resume reads)")
        if not self.model and not self.model_config:
            raise ConfigError(
                "no model: give --model DIR (a Hugging Face model folder) or --model-config PRESET"
            )
        if self.model and self.model_config:
            raise ConfigError("give --model or --model-config, not both")
        if self.fsdp_shard_embeddings and self.distributed != "fsdp":
            raise ConfigError(f"--fsdp-shard-embeddings needs --distributed fsdp, got --distributed {self.distributed}")
        return self

    def targets(self) -> str | list[str]:
        """target_modules as LoraConfig wants it: 'all-linear', a regex, or a list of names."""
        t = self.target_modules.strip()
        if t == "all-linear" or any(c in t for c in "*()[]|^$\\+?"):
            return t
        return [name.strip() for name in t.split(",") if name.strip()]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_toml(self) -> str:
        """The resolved config as TOML that ``--config`` reads back."""
        lines = ["# lorakit train: resolved configuration (defaults < --config file < flags)"]
        for f in fields(self):
            lines.append(f"{f.name} = {_toml_value(getattr(self, f.name))}")
        return "\n".join(lines) + "\n"

    @classmethod
    def load(
        cls, toml_path: str | Path | None = None, overrides: dict[str, Any] | None = None
    ) -> TrainConfig:
        """Defaults, then the TOML file, then ``overrides`` (flags); validated."""
        values: dict[str, Any] = {}
        if toml_path:
            values.update(read_toml(toml_path))
        for key, value in (overrides or {}).items():
            if value is not None:
                values[key] = value
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]!r}; known settings: {', '.join(sorted(known))}")
        return cls(**values).validate()


def read_toml(path: str | Path) -> dict[str, Any]:
    """A flat TOML file (a [train] table is accepted too) as a dict; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {err}") from None
    if set(data) == {"train"} and isinstance(data["train"], dict):
        data = data["train"]
    nested = [k for k, v in data.items() if isinstance(v, dict)]
    if nested:
        raise ConfigError(
            f"config file {str(path)!r}: table [{nested[0]}] is not a setting; use flat key = value"
        )
    return data


@functools.cache
def field_docs(cls: type = TrainConfig) -> dict[str, str]:
    """{field: the string literal under it}, read from the source (used for --help)."""
    try:
        tree = ast.parse(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body
    for node, nxt in itertools.pairwise(body):
        documented = isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and documented:
            docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def _field_type(f: dataclasses.Field) -> type:
    return {"str": str, "int": int, "float": float, "bool": bool}[str(f.type)]


def _coerce(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{name} must be true or false, got {value!r}")
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if not isinstance(value, str):
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


def _choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


__all__ = ["TrainConfig", "field_docs", "read_toml"]
