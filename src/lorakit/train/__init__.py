"""Fine-tuning: a readable training loop, data loading, and the runs behind ``lorakit train`` / ``compare``.

    from lorakit.train import TrainConfig, run
    summary = run(TrainConfig(model="my-model-dir", data="data.jsonl", max_steps=100))

Modules: config (TrainConfig), data (files -> token batches), modeling (model + method), loop (the loop),
checkpoint (resumable state), report (metrics, memory, plots), runner (one run end to end), compare,
export (merge), generate.
"""

from .config import TrainConfig
from .data import DataBundle, Example, build_data, collate
from .loop import LoopState, evaluate, train_loop
from .runner import run

__all__ = ["DataBundle", "Example", "LoopState", "TrainConfig", "build_data", "collate", "evaluate", "run",
           "train_loop"]
