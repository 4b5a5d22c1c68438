"""Distributed training on CPU (gloo, 2 processes): same losses and adapters as one process, resume across
world sizes. The references run in this process; the 2-process runs run in forked workers (no re-import),
all scenarios in one process group to keep the file fast."""

from __future__ import annotations

import json
import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lorakit._threads import one_thread
from lorakit.train import distributed
from lorakit.train.config import TrainConfig
from lorakit.train.modeling import qlora_available
from lorakit.train.runner import run

STEPS = 12
KILL_AT = 6
LOSS_TOL = 1e-5  # fp32; the only difference is the order of the gradient sums over the batch rows
ADAPTER_TOL = 1e-5  # per element, after 12 AdamW steps at lr 1e-3


class Kill:
    """A hook that stops the run after step ``at`` (checkpoint written), like a kill."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, state, record):
        if state.step == self.at:
            raise KeyboardInterrupt(f"killed at step {self.at}")


def config(out: Path, **kw) -> TrainConfig:
    base = {"model_config": "llama-tiny", "seq_len": 32, "batch_size": 4, "max_steps": STEPS, "lr": 1e-3,
                "progress": False, "plot": False, "device": "cpu", "save_every": 3, "output_dir": str(out)}
    return TrainConfig(**(base | kw))


def train(cfg: TrainConfig, kill: int = 0) -> None:
    try:
        run(cfg, hooks=[Kill(kill)] if kill else (), log=lambda _m: None)
    except KeyboardInterrupt:
        pass


def losses(out: Path) -> list[float]:
    return [r["loss"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def _worker(rank: int, world: int, port: int, tmp: str, jobs: list) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, kw, kill in jobs:
            train(config(Path(tmp) / name, **kw), kill)
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


QLORA = {"method": "qlora"}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every run the tests compare, made once: references on 1 process, the rest on 2."""
    if sys.platform != "linux":
        pytest.skip("the 2-process runs fork workers (Linux)")
    tmp = tmp_path_factory.mktemp("dist")
    with_qlora = qlora_available()
    with one_thread():  # tiny matmuls: one thread is faster, and fair to the 2 worker processes
        _make_runs(tmp, with_qlora)
    return tmp, with_qlora


def _make_runs(tmp: Path, with_qlora: bool) -> None:
    # one process
    train(config(tmp / "one"))
    if with_qlora:
        train(config(tmp / "one_q", **QLORA))
    train(config(tmp / "one_killed"), kill=KILL_AT)  # resumed below on 2 processes
    jobs = [
        ("ddp", {"distributed": "ddp"}, 0),
        ("fsdp", {"distributed": "fsdp"}, 0),
        ("fsdp_killed", {"distributed": "fsdp"}, KILL_AT),  # resumed below on 1 process
        ("one_killed", {"distributed": "fsdp", "resume": "latest"}, 0),
        # gradient accumulation: 2 micro-batches of 2 rows = the reference's 4 rows; no sync on the first
        ("ddp_accum", {"distributed": "ddp", "batch_size": 2, "grad_accum": 2}, 0),
        ("fsdp_accum", {"distributed": "fsdp", "batch_size": 2, "grad_accum": 2}, 0),
        ("fsdp_emb", {"distributed": "fsdp", "fsdp_shard_embeddings": True}, 0),  # llama-tiny is untied
    ]
    if with_qlora:
        jobs += [("ddp_q", dict(distributed="ddp", **QLORA), 0), ("fsdp_q", dict(distributed="fsdp", **QLORA), 0)]
    # fork is fast, but not where a GPU is visible: there autograd's first backward (any test's, even on the
    # CPU) starts per-device threads, and a fork after that fails, whether or not CUDA was initialized
    method = "spawn" if torch.cuda.is_available() or os.environ.get("LORAKIT_TEST_SPAWN") else "fork"
    ctx = torch.multiprocessing.start_processes(
        _worker, args=(2, _free_port(), str(tmp), jobs), nprocs=2, join=False, start_method=method
    )
    while not ctx.join(timeout=120):
        pass
    train(config(tmp / "fsdp_killed", resume="latest"))


def _check_same(tmp: Path, ref: str, other: str) -> None:
    a, b = losses(tmp / ref), losses(tmp / other)
    assert len(a) == len(b) == STEPS
    assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL, (a, b)
    wa, wb = adapter(tmp / ref), adapter(tmp / other)
    assert set(wa) == set(wb) and wa
    for k in wa:
        assert wa[k].dtype == wb[k].dtype and wa[k].shape == wb[k].shape
        assert torch.allclose(wa[k], wb[k], rtol=0, atol=ADAPTER_TOL), (k, float((wa[k] - wb[k]).abs().max()))
    cfg_a = json.loads((tmp / ref / "adapter" / "adapter_config.json").read_text())
    cfg_b = json.loads((tmp / other / "adapter" / "adapter_config.json").read_text())
    assert cfg_a == cfg_b


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "fsdp_emb"])
def test_two_processes_match_one_lora(runs, strategy):
    tmp, _ = runs
    _check_same(tmp, "one", strategy)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_gradient_accumulation_syncs_once_and_matches(runs, strategy):
    tmp, _ = runs
    _check_same(tmp, "one", f"{strategy}_accum")


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_match_one_qlora(runs, strategy):
    tmp, with_qlora = runs
    if not with_qlora:
        pytest.skip("lorakit.qlora is not available in this install")
    _check_same(tmp, "one_q", f"{strategy}_q")


def test_fsdp_run_killed_resumes_on_one_process(runs):
    tmp, _ = runs
    _check_same(tmp, "one", "fsdp_killed")


def test_one_process_run_killed_resumes_on_two(runs):
    tmp, _ = runs
    _check_same(tmp, "one", "one_killed")


def test_checkpoints_are_single_process_files(runs):
    tmp, _ = runs
    one = load_file(str(tmp / "one" / "checkpoints" / f"step-{STEPS:06d}" / "trainable.safetensors"))
    fsdp = load_file(str(tmp / "fsdp" / "checkpoints" / f"step-{STEPS:06d}" / "trainable.safetensors"))
    assert set(one) == set(fsdp)
    assert all(one[k].shape == fsdp[k].shape for k in one)  # full tensors, not one rank's shard
    opt_one = torch.load(tmp / "one" / "checkpoints" / f"step-{STEPS:06d}" / "optimizer.pt", weights_only=True)
    opt_fsdp = torch.load(tmp / "fsdp" / "checkpoints" / f"step-{STEPS:06d}" / "optimizer.pt", weights_only=True)
    assert opt_one["state"].keys() == opt_fsdp["state"].keys()
    for i, st in opt_one["state"].items():
        assert st["exp_avg"].shape == opt_fsdp["state"][i]["exp_avg"].shape


@pytest.mark.parametrize("bits", [4, 8])
def test_fsdp_shards_the_4bit_base(bits):
    """prepare_4bit_for_fsdp stores the packed codes as a frozen 1-D bf16 parameter of the same bytes (FSDP2
    before torch 2.13 shards only floating-point parameters); outputs, state dict, memory report unchanged."""
    if not qlora_available():
        pytest.skip("lorakit.qlora is not available in this install")
    import lorakit as lk
    from lorakit.layers import Linear4bit, Linear8bit

    cls = Linear4bit if bits == 4 else Linear8bit
    layer = cls.from_linear(torch.nn.Linear(63, 31), compute_dtype=torch.float32)  # 4-bit: an odd byte count
    codes = layer.weight.clone()
    x = torch.randn(3, 63)
    before, state_before = layer(x), {k: v.clone() for k, v in layer.state_dict().items()}
    report_before = lk.memory_report(torch.nn.Sequential(layer))
    (found,) = distributed.prepare_4bit_for_fsdp(torch.nn.Sequential(layer))
    assert found is layer and "weight" not in layer._buffers
    assert isinstance(layer.weight, torch.nn.Parameter) and not layer.weight.requires_grad
    assert layer.weight.dtype == torch.bfloat16 and layer.weight.dim() == 1
    assert layer.codes.dtype == codes.dtype and torch.equal(layer.codes, codes)
    assert torch.equal(layer(x), before)
    state = layer.state_dict()
    assert state.keys() == state_before.keys() and all(torch.equal(state[k], state_before[k]) for k in state)
    assert lk.memory_report(torch.nn.Sequential(layer)) == report_before
    layer.to(torch.float32)  # a dtype cast moves the code bytes, never converts them
    assert layer.weight.dtype == torch.bfloat16 and torch.equal(layer.codes, codes)
    assert torch.equal(layer(x), before)


def test_short_last_batch_gives_an_idle_rank_an_ignored_row():
    session = distributed.Session(rank=1, world_size=2)
    ids = torch.tensor([[5, 6, 7]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    mine = session.shard(batch)
    assert mine["input_ids"].shape == (1, 3) and (mine["labels"] == -100).all()
    assert torch.equal(batch["labels"], ids)  # the global batch is untouched
    assert session._dummy_tokens == 3
    assert distributed.Session(rank=0, world_size=2).shard(batch)["labels"].tolist() == [[5, 6, 7]]


def test_batch_must_split_evenly_and_strategy_needs_processes(tmp_path):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="needs several processes"):
        distributed.start(config(tmp_path, distributed="fsdp"))
    assert not distributed.start(config(tmp_path)).enabled


def test_relaunch_command_strips_the_flag():
    argv = ["train", "--nproc-per-node", "2", "--lr", "1e-3", "--nproc-per-node=3"]
    stripped = distributed.strip_flag(argv, "--nproc-per-node")
    assert stripped == ["train", "--lr", "1e-3"]
    cmd = distributed.relaunch_command(2, stripped)
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2"]
    assert cmd[-4:] == ["lorakit", "train", "--lr", "1e-3"]


@pytest.mark.parametrize("tied", [False, True])
def test_untied_embedding_and_head_are_their_own_fsdp_units(tied):
    """Untied: both returned (sharded on their own, gathered only around their use); tied: none (they share one
    weight, so they must stay in one unit, the root)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied))
    found = distributed._untied_embeddings(model)
    assert found == ([] if tied else [model.get_input_embeddings(), model.get_output_embeddings()])
    assert distributed._untied_embeddings(torch.nn.Linear(2, 2)) == []


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_codes_are_stored_in_the_fsdp_compute_dtype(dtype):
    """FSDP casts gathered parameters to the policy's param_dtype: the codes must already have it (a cast of
    reinterpreted code bytes would destroy them). Re-storing from one float dtype to another keeps the bytes."""
    if not qlora_available():
        pytest.skip("lorakit.qlora is not available in this install")
    from lorakit.layers import Linear4bit

    layer = Linear4bit.from_linear(torch.nn.Linear(63, 31), compute_dtype=torch.float32)
    codes, x = layer.weight.clone(), torch.randn(3, 63)
    before = layer(x)
    distributed.prepare_4bit_for_fsdp(torch.nn.Sequential(layer))  # bf16 first, as an earlier call may have
    distributed.prepare_4bit_for_fsdp(torch.nn.Sequential(layer), dtype)
    assert layer.weight.dtype == dtype and torch.equal(layer.codes, codes)
    assert torch.equal(layer(x), before)


def test_cli_relaunches_through_torchrun_and_matches_one_process(tmp_path):
    """`lorakit train --nproc-per-node 2` end to end (torchrun, gloo, FSDP2, two real processes): exit 0, the
    same adapter as one process within the 2-vs-1 tolerance, and nothing printed by the second rank."""
    import subprocess
    import sys

    common = ["--model-config", "llama-tiny", "--seq-len", "32", "--batch-size", "4", "--max-steps", "3",
              "--lr", "1e-3", "--device", "cpu", "--no-progress", "--no-plot", "--save-every", "0"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    runs = {"one": [], "two": ["--distributed", "fsdp", "--nproc-per-node", "2"]}
    for name, extra in runs.items():
        done = subprocess.run([sys.executable, "-m", "lorakit", "train", *common, *extra,
                               "--output-dir", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=300, env=env, check=False)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("saved:") == 1, done.stdout  # rank 0 reports, rank 1 stays quiet
    one, two = adapter(tmp_path / "one"), adapter(tmp_path / "two")
    assert set(one) == set(two) and one
    for k in one:
        assert torch.allclose(one[k], two[k], rtol=0, atol=ADAPTER_TOL), k
