"""Training on several processes with torch.distributed: DDP or FSDP2, launched by torchrun.

Nothing here is home-made parallelism: DDP (``DistributedDataParallel``) or FSDP2
(``torch.distributed.fsdp.fully_shard``) do the communication. This module only adapts the single-process
trainer to them, so that a run on N processes follows the *same trajectory* as a run on one:

* ``batch_size`` is the global micro-batch. Every rank draws the same global order from the same seeded
  sampler, collates the whole micro-batch (so padding is the same as on one process) and keeps its rows
  (``Session.shard``). The loss of a step is the sum of token losses over all ranks divided by the global
  number of targets; each rank multiplies its part by the world size, which undoes the averaging of DDP's
  all-reduce and FSDP's reduce-scatter, so the gradient is the one-process gradient up to summation order.
* DDP communicates adapter gradients only: it registers for reduction just the parameters that require
  gradients, and the frozen base has none. FSDP2 shards every parameter, frozen ones included: each
  decoder layer is one FSDP group, the root holds the rest. ``--autocast bf16`` gives FSDP a mixed-precision
  policy (bf16 compute, fp32 gradient reduction); ``--gradient-checkpointing`` is HF's non-reentrant
  activation checkpointing inside each layer.
* QLoRA under FSDP2: FSDP shards parameters, not buffers. ``Linear4bit`` (and ``Linear8bit``) keep their
  codes in a buffer, so ``prepare_4bit_for_fsdp`` re-registers that buffer as a frozen ``nn.Parameter`` (the
  same tensor, ``requires_grad=False``) and each 4-bit layer becomes its own FSDP group with no dtype cast, so
  the codes are sharded as bytes and never rounded. The small quant state (absmax, code books) stays
  replicated (about 1/64 of the packed bytes with double quantization).
* Checkpoints and the saved adapter are the single-process files: under FSDP the trainable parameters and
  optimizer moments are gathered to full tensors first (``gathered``, ``full_optimizer_state``), rank 0
  writes them atomically, the others wait. Loading scatters them back to whatever sharding the current
  run has, so a run can resume on a different number of processes. RNG states are rank 0's.

The output directory must be one that every rank sees (one machine, or a shared filesystem).
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..errors import ConfigError
from . import checkpoint as ckpt
from .data import IGNORE_INDEX

STRATEGIES = ("auto", "none", "ddp", "fsdp")
"""auto: ddp when launched on several processes, none otherwise."""


# ------------------------------------------------------------------------------------------ session
@dataclass
class Session:
    """Where this process stands in the job, and the few operations the loop needs from it.

    With ``world_size == 1`` every method is the single-process behaviour (no communication).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    strategy: str = "none"
    owns_group: bool = False
    wrapped: nn.Module | None = field(default=None, repr=False)
    _dummy_tokens: int = field(default=0, repr=False)

    # ------------------------------------------------------------------ facts
    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def grad_scale(self) -> float:
        """Factor on each rank's loss that undoes the gradient averaging of DDP / FSDP (see module doc)."""
        return float(self.world_size)

    def device(self, device: torch.device) -> torch.device:
        """This rank's device: cuda:LOCAL_RANK when the run asks for a GPU, else the CPU."""
        if self.enabled and device.type == "cuda":
            device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(device)
        return device

    def log(self, log: Callable[[str], None]) -> Callable[[str], None]:
        """``log`` on rank 0, silence elsewhere (one copy of every line)."""
        return log if self.is_main else (lambda _msg: None)

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    # ------------------------------------------------------------------ the step
    def shard(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """This rank's rows of a collated global micro-batch (contiguous, in rank order).

        A rank left without rows (the short last batch of an epoch) gets a copy of row 0 whose labels are
        all ignored: it joins the collectives, adds nothing to the loss or the gradient, and its tokens are
        not counted (``reduce_step``)."""
        if not self.enabled:
            return batch
        mine = {k: v.tensor_split(self.world_size, dim=0)[self.rank] for k, v in batch.items()}
        if mine["input_ids"].shape[0] == 0:
            mine = {k: v[:1].clone() for k, v in batch.items()}
            mine["labels"].fill_(IGNORE_INDEX)
            self._dummy_tokens += int(mine["attention_mask"].sum())
        return mine

    def reduce_step(self, loss_sum: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
        """(loss sum, tokens) over all ranks, from each rank's part: one small all-reduce per step."""
        if not self.enabled:
            return loss_sum, tokens
        tokens, self._dummy_tokens = tokens - self._dummy_tokens, 0
        both = torch.stack([loss_sum.detach().double(), torch.tensor(float(tokens), device=loss_sum.device,
                                                                     dtype=torch.float64)])
        dist.all_reduce(both)
        return both[0].to(loss_sum.dtype), int(both[1])

    def grad_sync(self, model: nn.Module, sync: bool) -> None:
        """Reduce gradients only on the last micro-batch of a step (grad_accum > 1 saves communication)."""
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model.require_backward_grad_sync = sync
        elif hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(sync)

    def metrics_log(self, log):
        """The metrics file on rank 0; a log that reads it but never writes elsewhere."""
        return log if self.is_main else _ReadOnlyLog(log)

    # ------------------------------------------------------------------ the model
    def wrap(self, model: nn.Module, cfg) -> nn.Module:
        """The module the loop trains: ``model`` itself, DDP around it, or ``model`` sharded in place
        (FSDP2). Call after the adapters are injected and gradient checkpointing is on, before the
        optimizer exists."""
        if not self.enabled or self.strategy == "none":
            self.wrapped = model
        elif self.strategy == "ddp":
            device = next(model.parameters()).device
            ddp = nn.parallel.DistributedDataParallel
            # buffers (rotary tables, 4-bit codes and state) are the same on every rank: no sync per forward
            quiet = ({"forward_sync_buffers": False} if "forward_sync_buffers" in inspect.signature(ddp).parameters
                     else {"broadcast_buffers": False})
            self.wrapped = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **quiet)
        else:
            self.wrapped = shard_fsdp(model, mixed_precision(cfg, next(model.parameters()).device),
                                      separate_embeddings=getattr(cfg, "fsdp_shard_embeddings", False))
        return self.wrapped

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, root: Path, step: int, model: nn.Module, optimizer, state: dict, scaler=None,
                        keep: int = 2) -> Path:
        """checkpoint.save_checkpoint with full tensors, written by rank 0 (every rank must call it)."""
        inner = unwrap(model)
        final = root / f"step-{step:06d}"
        with gathered(inner):
            opt = _StateView(full_optimizer_state(optimizer))
            if self.is_main:
                final = ckpt.save_checkpoint(root, step, inner, opt, state, scaler, keep=keep)
        self.barrier()
        return final

    def load_checkpoint(self, path: Path, model: nn.Module, optimizer, fingerprint: dict, scaler=None) -> dict:
        """checkpoint.load_checkpoint on every rank, then the full tensors are sharded as this run shards."""
        inner = unwrap(model)
        with gathered(inner, write_back=True):
            view = _LoadView(optimizer)
            saved = ckpt.load_checkpoint(path, inner, view, fingerprint, scaler)
        load_full_optimizer_state(optimizer, view.loaded)
        return saved


def start(cfg) -> Session:
    """The session of this process: joins the process group torchrun describes (WORLD_SIZE, RANK,
    LOCAL_RANK, MASTER_ADDR/PORT in the environment), or a single-process session without it.

    A process group that already exists (a test that spawned its own) is used as is and not closed here.
    """
    strategy = getattr(cfg, "distributed", "auto")
    if strategy not in STRATEGIES:
        raise ConfigError(f"distributed must be one of {', '.join(STRATEGIES)}; got {strategy!r}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if not dist.is_initialized() and world <= 1:
        if strategy in ("ddp", "fsdp"):
            raise ConfigError(f"--distributed {strategy} needs several processes: launch with "
                              "torchrun --nproc-per-node N -m lorakit train ... or lorakit train --nproc-per-node N")
        return Session()
    owns = False
    if not dist.is_initialized():
        wants_gpu = cfg.device.startswith("cuda") or (cfg.device == "auto" and torch.cuda.is_available())
        dist.init_process_group("nccl" if wants_gpu else "gloo")
        owns = True
    world, rank = dist.get_world_size(), dist.get_rank()
    local = int(os.environ.get("LOCAL_RANK", rank))
    if strategy == "auto":
        strategy = "ddp" if world > 1 else "none"
    if world > 1 and cfg.batch_size % world:
        raise ConfigError(f"batch_size {cfg.batch_size} is the global micro-batch and must be divisible by "
                          f"the {world} processes (each takes batch_size / {world} rows)")
    return Session(rank=rank, world_size=world, local_rank=local, strategy=strategy, owns_group=owns)


def shutdown(session: Session | None = None) -> None:
    """Leave the process group this module created (torchrun workers exit cleanly)."""
    if dist.is_initialized() and (session is None or session.owns_group):
        dist.destroy_process_group()


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards in place: the module itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ------------------------------------------------------------------------------------------ FSDP2
def mixed_precision(cfg, device: torch.device):
    """FSDP2's policy: compute in bf16/fp16 with fp32 gradient reduction when autocast asks for it."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    mode = cfg.autocast
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "none"
    if mode == "none":
        return MixedPrecisionPolicy()
    dtype = torch.bfloat16 if mode == "bf16" else torch.float16
    return MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _layer_classes(model: nn.Module) -> tuple[str, ...]:
    """Class names of the model's repeated blocks (HF's ``_no_split_modules``, else '*DecoderLayer')."""
    names = tuple(getattr(model, "_no_split_modules", None) or ())
    return names or tuple({type(m).__name__ for m in model.modules() if type(m).__name__.endswith("Layer")
                           and type(m).__name__.endswith(("DecoderLayer", "EncoderLayer", "Block"))})


def shard_fsdp(model: nn.Module, policy, separate_embeddings: bool = False) -> nn.Module:
    """fully_shard every decoder layer, with ``separate_embeddings`` an untied input embedding and output
    head, then the root; returns ``model``.

    Packed 4/8-bit codes are stored in the policy's compute dtype first (``prepare_4bit_for_fsdp``), so that
    the mixed-precision cast of the all-gathered parameters is the identity on their bytes: the quantized
    linears stay inside their decoder layer's unit (one all-gather per layer, not one per projection: eight
    times fewer collectives and FSDP hooks per step for a Llama block).
    The mesh is built on the model's device type: fully_shard's default mesh is CUDA whenever a GPU is
    visible, which would put a CPU (gloo) run on a GPU box onto cuda:RANK (and fail for ranks beyond the GPUs).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    prepare_4bit_for_fsdp(model, policy.param_dtype or torch.bfloat16)
    classes = _layer_classes(model)
    for module in model.modules():
        if module is not model and type(module).__name__ in classes:
            fully_shard(module, mesh=mesh, mp_policy=policy)
    for module in _untied_embeddings(model) if separate_embeddings else ():
        fully_shard(module, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def prepare_4bit_for_fsdp(model: nn.Module, dtype: torch.dtype = torch.bfloat16) -> list[nn.Module]:
    """Re-register each 4/8-bit Linear's packed codes (a uint8 or int8 buffer) as a frozen 1-D ``dtype``
    nn.Parameter holding the same bytes, so that fully_shard shards it (FSDP2 before torch 2.13 refuses
    integer parameters); returns those layers. ``dtype`` must be the FSDP policy's param_dtype (or, with no
    policy dtype, anything): FSDP casts parameters to it, which is a no-op only when they already have it.
    The layers read their codes through ``layer.codes``."""
    from ..layers.quantized import FrozenPackedLinear

    layers = [m for m in model.modules() if isinstance(m, FrozenPackedLinear)]
    for layer in layers:
        if layer._code_view is None or layer.weight.dtype != dtype:
            layer.store_codes_as_float(dtype)
    return layers


def _untied_embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the output head when they share no parameter: each its own FSDP unit, so that
    they are gathered only around their own use instead of for the whole step as part of the root (2 GiB at
    a 128k vocabulary in bf16), at the price of gathering the head twice. Tied ones (one weight in two
    modules) stay in the root."""
    found = [getattr(model, name)() for name in ("get_input_embeddings", "get_output_embeddings")
             if callable(getattr(model, name, None))]
    found = [m for m in found if isinstance(m, nn.Module)]
    if len(found) != 2 or any(a is b for a in found[0].parameters() for b in found[1].parameters()):
        return []
    return found


def _is_dtensor(t: Any) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        return False
    return isinstance(t, DTensor)


@contextlib.contextmanager
def gathered(model: nn.Module, write_back: bool = False) -> Iterator[nn.Module]:
    """Inside: the model's sharded trainable parameters are full tensors (collective: every rank enters).

    With ``write_back`` the full tensors, as changed inside, are sharded back into the parameters on exit.
    Without sharded parameters (one process, DDP) it does nothing.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter, nn.Parameter]] = []
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and p.requires_grad and _is_dtensor(p):
                full = nn.Parameter(p.detach().full_tensor().clone(), requires_grad=True)
                module._parameters[name] = full
                swapped.append((module, name, p, full))
    try:
        yield model
    finally:
        for module, name, original, full in swapped:
            module._parameters[name] = original
            if write_back:
                with torch.no_grad():
                    original.to_local().copy_(_shard_like(full.detach(), original).to_local())


def _shard_like(full: torch.Tensor, like) -> Any:
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device), like.device_mesh, like.placements)


def full_optimizer_state(optimizer) -> dict:
    """optimizer.state_dict() with every sharded (DTensor) state tensor gathered to a full tensor: the
    same layout as a single-process optimizer. Collective under FSDP."""
    sd = optimizer.state_dict()
    state = {}
    for idx, per_param in sd["state"].items():
        state[idx] = {k: (v.full_tensor() if _is_dtensor(v) else v) for k, v in per_param.items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def load_full_optimizer_state(optimizer, sd: dict) -> None:
    """Load a full (single-process layout) optimizer state into an optimizer over sharded parameters."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state = {}
    for idx, per_param in sd["state"].items():
        p = params[int(idx)]
        state[idx] = {
            k: (_shard_like(v, p) if _is_dtensor(p) and torch.is_tensor(v) and v.shape == p.shape else v)
            for k, v in per_param.items()
        }
    optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})


class _StateView:
    """What checkpoint.save_checkpoint asks of an optimizer: a state_dict (here an already-full one)."""

    def __init__(self, sd: dict):
        self._sd = sd

    def state_dict(self) -> dict:
        return self._sd


class _LoadView:
    """Catches the optimizer state checkpoint.load_checkpoint reads, to shard it afterwards."""

    def __init__(self, optimizer):
        self.optimizer, self.loaded = optimizer, None

    def load_state_dict(self, sd: dict) -> None:
        self.loaded = sd


class _ReadOnlyLog:
    """metrics.jsonl as seen from ranks > 0: read, never written."""

    def __init__(self, log):
        self._log = log

    def read(self) -> list[dict]:
        return self._log.read()

    def truncate_after(self, step: int) -> list[dict]:
        return [r for r in self._log.read() if r.get("step", 0) <= step]

    def reset(self) -> None:
        pass

    def append(self, record: dict) -> None:
        pass


# ------------------------------------------------------------------------------------------ launching
def relaunch_command(nproc: int, argv: list[str]) -> list[str]:
    """The torchrun command that runs ``lorakit <argv>`` on ``nproc`` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "lorakit", *argv]


def relaunch(nproc: int, argv: list[str]) -> int:
    """Run ``lorakit <argv>`` under torchrun with ``nproc`` processes; returns its exit status."""
    if nproc < 1:
        raise ConfigError(f"--nproc-per-node must be >= 1, got {nproc}")
    if shutil.which(sys.executable) is None:  # pragma: no cover
        raise ConfigError(f"cannot find the Python interpreter {sys.executable} to launch torchrun")
    return subprocess.call(relaunch_command(nproc, argv))


def strip_flag(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag VALUE`` / ``flag=VALUE``."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == flag:
            skip = True
        elif not arg.startswith(flag + "="):
            out.append(arg)
    return out


__all__ = [
    "STRATEGIES",
    "Session",
    "full_optimizer_state",
    "gathered",
    "load_full_optimizer_state",
    "prepare_4bit_for_fsdp",
    "relaunch",
    "relaunch_command",
    "shard_fsdp",
    "shutdown",
    "start",
    "unwrap",
]
