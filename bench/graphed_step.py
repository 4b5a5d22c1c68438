"""A whole training step (forward, backward, optimizer step) captured once as a CUDA graph, then replayed.

An experiment, kept in bench/ because it lost. The idea: a LoRA step launches many small kernels (the
rank-r GEMMs, the optimizer over hundreds of small tensors) with Python dispatch between them; if the GPU
waited on the CPU, a replayed graph would remove the wait. Measured on an H100 (2026-11-23,
bench/results/2026-11-23_h100_s3_train_1b_graphs.txt, qlora_graphs.txt): every graphed step was slower than
the same step run eagerly - Llama-1B 4x2048 floor 58.0k -> 52.2k tokens/s, lorakit 50.7k -> 46.8k, PEFT
45.9k -> 42.7k; Llama-3-8B QLoRA lorakit 8.00k -> 7.69k - so at these sizes the steps are not
launch-bound, and captured GEMMs ran slower. Losses of graphed and eager steps agreed (GPU check, same
run). It needs what every whole-step CUDA graph needs:

- fixed shapes: every batch has the shape of the first one (packed or padded to one length);
- no host synchronisation inside the step (``.item()``, data-dependent shapes);
- an optimizer with ``capturable=True`` (its step counter lives on the GPU) and, to change the learning
  rate between replays, a tensor learning rate (``lr=torch.tensor(...)``) updated in place;
- one micro-batch per step: the captured backward writes the gradients, it does not accumulate them.

The first ``warmup`` calls run eagerly on a side stream (they are real steps: their updates count), the next
call captures the step and replays it, and every later call copies its batch into the captured input
buffers and replays. The returned loss is the graph's output tensor: read it before the next call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping

import torch

LossFn = Callable[[Mapping[str, torch.Tensor]], torch.Tensor]


class GraphedTrainStep:
    """``step(batch) -> loss``: forward + backward + (optional) clip + optimizer step, CUDA-graphed after warm-up.

    ``optimizer`` may be None (forward + backward only, e.g. to time a frozen model's floor).
    """

    def __init__(
        self,
        loss_fn: LossFn,
        optimizer: torch.optim.Optimizer | None,
        warmup: int = 3,
        clip_grad_norm: float | None = None,
        params: Iterable[torch.nn.Parameter] | None = None,
    ):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedTrainStep needs a CUDA device; run the step eagerly on this machine")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (eager steps before capture, for lazy initialisation), got {warmup}")
        if optimizer is not None:
            _check_capturable(optimizer)
        if clip_grad_norm is not None and params is None:
            raise ValueError("clip_grad_norm needs the params to clip")
        self.loss_fn = loss_fn
        self.optimizer = optimizer
        self.warmup = warmup
        self.clip_grad_norm = clip_grad_norm
        self.params = list(params) if params is not None else []
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_batch: dict[str, torch.Tensor] | None = None
        self.static_loss: torch.Tensor | None = None
        self.side_stream = torch.cuda.Stream()

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        self._check_batch(batch)
        self.calls += 1
        if self.calls <= self.warmup:
            return self._eager(batch)
        if self.graph is None:
            self._capture(batch)
        else:
            for key, value in batch.items():
                self.static_batch[key].copy_(value, non_blocking=True)
        self.graph.replay()
        return self.static_loss

    def _step_body(self, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        loss = self.loss_fn(batch)
        loss.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm, foreach=True)
        if self.optimizer is not None:
            self.optimizer.step()
        return loss.detach()

    def _eager(self, batch):
        # on a side stream, as the capture will be: the allocator's pools and lazy inits then match
        self.side_stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.side_stream):
            if self.optimizer is not None:
                self.optimizer.zero_grad(set_to_none=True)
            loss = self._step_body(batch)
        torch.cuda.current_stream().wait_stream(self.side_stream)
        return loss

    def _capture(self, batch):
        self.static_batch = {key: value.detach().clone() for key, value in batch.items()}
        if self.optimizer is not None:
            # gradients allocated inside the capture live in the graph's pool and are overwritten by each replay
            self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.static_loss = self._step_body(self.static_batch)

    def _check_batch(self, batch):
        if self.static_batch is None:
            return
        if set(batch) != set(self.static_batch):
            raise ValueError(f"batch keys {sorted(batch)} differ from the captured step's {sorted(self.static_batch)}")
        for key, value in batch.items():
            ref = self.static_batch[key]
            if value.shape != ref.shape or value.dtype != ref.dtype:
                raise ValueError(
                    f"batch[{key!r}] is {tuple(value.shape)} {value.dtype}; the captured step takes "
                    f"{tuple(ref.shape)} {ref.dtype} (a CUDA graph needs fixed shapes: pack or pad to one length)"
                )


def _check_capturable(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        if not group.get("capturable", False):
            raise ValueError(
                f"{type(optimizer).__name__} must be built with capturable=True to run inside a CUDA graph "
                "(its step count then stays on the GPU); e.g. torch.optim.AdamW(params, fused=True, capturable=True)"
            )
