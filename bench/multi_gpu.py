"""Multi-GPU LoRA / QLoRA through lorakit.train.distributed: DDP scaling and FSDP2 + QLoRA memory.

Two measurements (issue 7), each run on 1 GPU and on N GPUs, every run in fresh torchrun processes:

* ddp:        Llama-3.2-1B shape, bf16 base, LoRA r=16 on all linear layers, batch 4 x 2048 *per GPU*,
              tokens/s of the whole job (median step time after warm-up). Goal: N=2 >= 1.85x one GPU.
* fsdp-qlora: Llama-3-8B shape, NF4 base (double quant), LoRA r=16, bf16 compute, gradient checkpointing,
              batch 2 x 2048 per GPU; peak allocated memory per GPU over the training steps (the model
              resident included). On 1 GPU the model is not sharded (plain QLoRA); on N, FSDP2 shards the
              4-bit codes. Goal: N=2 <= 0.6x one GPU.
* fsdp-qlora-global: the same with the same *global* batch (2 x 2048 split over the GPUs); on one GPU it is
              fsdp-qlora, whose row it reuses.

The step is the trainer's: the same Session (wrap, shard, loss scaling, gradient sync) as ``lorakit train``.
Weights are random (built from a config, no download).

    python bench/multi_gpu.py                   # both, on 1 and 2 GPUs (needs 2 GPUs)
    python bench/multi_gpu.py --gpus 4 --only ddp
    python bench/multi_gpu.py --only fsdp-qlora,fsdp-qlora-global
    python bench/multi_gpu.py --shape-scale tiny --device cpu --gpus 2   # smoke test of the script on CPU
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from types import SimpleNamespace

import torch

warnings.filterwarnings("ignore")

SHAPES = {
    "llama-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                 "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                 "tie_word_embeddings": True, "head_dim": 64, "rope_theta": 500000.0},
    "llama3-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                  "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                  "tie_word_embeddings": False, "head_dim": 128, "rope_theta": 500000.0},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 512, "head_dim": 32},
}
JOBS = {  # name -> shape, per-GPU batch, seq, qlora, strategy on N > 1, gradient checkpointing
    "ddp": {"shape": "llama-1b", "batch": 4, "seq": 2048, "qlora": False, "strategy": "ddp", "ckpt": False},
    "fsdp-qlora": {"shape": "llama3-8b", "batch": 2, "seq": 2048, "qlora": True, "strategy": "fsdp", "ckpt": True},
    # the same job with the same *global* batch (2 x 2048 split over the GPUs): one job moved onto more cards
    "fsdp-qlora-global": {"shape": "llama3-8b", "batch": 2, "seq": 2048, "qlora": True, "strategy": "fsdp",
                          "ckpt": True, "global": True},
}


# ------------------------------------------------------------------------------------------ worker
def worker(args: argparse.Namespace) -> None:
    """One process of a torchrun job: build, wrap, train ``steps`` steps, rank 0 writes a JSON line."""
    from lorakit.train import distributed

    job = JOBS[args.worker]
    shape = args.shape_scale or job["shape"]
    seq = args.seq or job["seq"]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    per_gpu = job["batch"] // world if job.get("global") else job["batch"]
    if per_gpu < 1:
        sys.exit(f"{args.worker}: global batch {job['batch']} < {world} processes")
    cfg = SimpleNamespace(distributed=job["strategy"] if world > 1 else "auto", device=args.device,
                          batch_size=per_gpu * world, autocast="bf16", fsdp_shard_embeddings=args.shard_embeddings)
    session = distributed.start(cfg)
    measure(args, job, session, cfg, shape, seq, world, per_gpu)
    # the sharded model (its DTensors hold the process group) is gone before the group is left: leaving
    # first made ~1 in 10 CPU/gloo runs abort at interpreter exit ("terminate called without an active exception")
    gc.collect()
    distributed.shutdown(session)


def measure(args, job: dict, session, cfg, shape: str, seq: int, world: int, per_gpu: int) -> None:
    """Build, wrap and train; rank 0 appends the row to ``args.result``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import lorakit
    from lorakit.train import distributed
    from lorakit.train.loop import loss_sum
    from lorakit.train.losses import fused_head_loss, fused_head_supported

    device = session.device(torch.device(args.device))
    dtype = torch.bfloat16

    torch.manual_seed(0)
    hf = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(4096, seq), attn_implementation="sdpa")
    # built on the GPU in bf16 (16 GB for the 8B, then quantized layer by layer; peak memory is counted from
    # after the warm-up steps): a CPU build of 8B takes minutes per process
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(hf).to(dtype)
    finally:
        torch.set_default_dtype(default)
    if job["qlora"]:
        from lorakit import qlora

        qlora.quantize_model(model, quant_type="nf4", double_quant=True, compute_dtype=dtype, device=device)
        model.to(device)
        qlora.prepare_for_kbit_training(model, gradient_checkpointing=job["ckpt"])
    else:
        model.requires_grad_(False)
        if job["ckpt"]:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    torch.manual_seed(1)
    lorakit.inject(model, lorakit.LoraConfig(r=16, alpha=32, target_modules="all-linear", dtype=torch.float32))
    trained = session.wrap(model, cfg)
    params = [p for p in trained.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=device.type == "cuda")

    gen = torch.Generator().manual_seed(0)
    batch = per_gpu * world
    ids = torch.randint(0, hf.vocab_size, (batch, seq), generator=gen)
    full = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    targets = batch * (seq - 1)
    local = {k: v.to(device) for k, v in session.shard(full).items()}
    autocast = torch.autocast(device.type, dtype=dtype)

    inner = distributed.unwrap(trained)
    if args.loss == "fused" and not fused_head_supported(inner):
        sys.exit("--loss fused: this model's head is not eligible (see lorakit.train.losses.fused_head_supported)")

    def forward_loss() -> torch.Tensor:
        with autocast:
            if args.loss == "fused":  # the trainer's default: output layer + loss fused, no logits tensor
                with fused_head_loss(inner):
                    return trained(input_ids=local["input_ids"], attention_mask=local["attention_mask"],
                                   labels=local["labels"]).loss
            logits = trained(input_ids=local["input_ids"], attention_mask=local["attention_mask"]).logits
        if args.loss == "plain":  # the one-shot fp32 formula, for the cost of the chunked one
            return torch.nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(), local["labels"][:, 1:].reshape(-1),
                reduction="sum")
        return loss_sum(logits, local["labels"], "causal-lm")[0]

    def step() -> float:
        loss = forward_loss()
        (loss * session.grad_scale / targets).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total, _ = session.reduce_step(loss.detach().float(), 0)
        return float(total) / targets

    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    resident = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    times, losses = [], []
    for _ in range(args.steps):
        session.barrier()
        t0 = time.perf_counter()
        losses.append(step())
        if device.type == "cuda":
            torch.cuda.synchronize()
        session.barrier()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    peaks = torch.tensor([peak, resident], dtype=torch.float64, device=device)
    if session.enabled:
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    if session.is_main:
        median = statistics.median(times)
        row = {"job": args.worker, "loss": args.loss, "shard_embeddings": args.shard_embeddings, "shape": shape,
               "gpus": world, "strategy": session.strategy,
               "batch_per_gpu": per_gpu, "seq": seq, "resident_gib_max": float(peaks[1]), "median_step_s": median,
               "tokens_per_s": batch * seq / median, "peak_gib_per_gpu_max": float(peaks[0]),
               "last_loss": losses[-1], "device": torch.cuda.get_device_name(device) if device.type == "cuda"
               else "cpu", "torch": torch.__version__}
        with open(args.result, "a") as f:
            f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------------------------ driver
def launch(job: str, gpus: int, args: argparse.Namespace, result: Path) -> int:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}",
           __file__, "--worker", job, "--result", str(result), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--device", args.device, "--loss", args.loss]
    if args.shard_embeddings:
        cmd.append("--shard-embeddings")
    if args.shape_scale:
        cmd += ["--shape-scale", args.shape_scale]
    if args.seq:
        cmd += ["--seq", str(args.seq)]
    print("$", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def _same_on_one_gpu(job: str) -> str:
    """The per-GPU-batch job that a global-batch job equals on one GPU."""
    spec = {k: v for k, v in JOBS[job].items() if k != "global"}
    return next((name for name, other in JOBS.items() if other == spec), job)


def report(rows: list[dict]) -> None:
    print(f"\n{'job':<17} {'gpus':>4} {'strategy':<8} {'batch/GPU':>9} {'tokens/s':>10} {'step s':>8} "
          f"{'resident GiB':>12} {'peak GiB/GPU':>13} device")
    for r in rows:
        print(f"{r['job']:<17} {r['gpus']:>4} {r['strategy']:<8} {r['batch_per_gpu']:>9} {r['tokens_per_s']:>10,.0f} "
              f"{r['median_step_s']:>8.3f} {r.get('resident_gib_max', float('nan')):>12.2f} "
              f"{r['peak_gib_per_gpu_max']:>13.2f} {r['device']}")
    for job, spec in JOBS.items():
        mine = {r["gpus"]: r for r in rows if r["job"] == job}
        if 1 not in mine and spec.get("global"):
            mine.update({r["gpus"]: r for r in rows if r["job"] == _same_on_one_gpu(job) and r["gpus"] == 1})
        if 1 not in mine:
            continue
        for n, r in sorted(mine.items()):
            if n == 1:
                continue
            if job == "ddp":
                ratio = r["tokens_per_s"] / mine[1]["tokens_per_s"]
                print(f"ddp scaling 1 -> {n} GPUs: {ratio:.2f}x (goal for 2: >= 1.85x)")
            else:
                ratio = r["peak_gib_per_gpu_max"] / mine[1]["peak_gib_per_gpu_max"]
                print(f"{job} peak memory per GPU {n} vs 1: {ratio:.2f}x (goal for 2: <= 0.6x)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=2, help="the multi-GPU size compared with 1 (default 2)")
    parser.add_argument("--only", default=",".join(JOBS), help=f"comma-separated jobs of {', '.join(JOBS)}")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--shape-scale", choices=tuple(SHAPES), default=None,
                        help="override every job's shape (tiny: a smoke test)")
    parser.add_argument("--loss", choices=("fused", "chunked", "plain"), default="fused",
                        help="fused: the trainer's default (output layer + loss fused); chunked: logits formed, "
                             "loss in row chunks; plain: one fp32 cross_entropy over the logits")
    parser.add_argument("--shard-embeddings", action="store_true",
                        help="FSDP: the untied embedding and head as units of their own (--fsdp-shard-embeddings)")
    parser.add_argument("--seq", type=int, default=0, help="override the sequence length")
    parser.add_argument("--worker", choices=tuple(JOBS), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    if args.device == "cuda" and torch.cuda.device_count() < args.gpus:
        sys.exit(f"needs {args.gpus} GPUs, found {torch.cuda.device_count()}")
    result = Path(tempfile.mkdtemp(prefix="lorakit-multi-gpu-")) / "rows.jsonl"
    failed = []
    jobs = [j for j in args.only.split(",") if j]
    if unknown := set(jobs) - set(JOBS):
        sys.exit(f"unknown job(s) {sorted(unknown)}; choose from {', '.join(JOBS)}")
    for job in jobs:
        for gpus in (1, args.gpus):
            if gpus == 1 and JOBS[job].get("global") and _same_on_one_gpu(job) in jobs:
                continue  # on one GPU the global-batch job is the per-GPU one: reuse its row
            before = len(result.read_text().splitlines()) if result.exists() else 0
            rc = launch(job, gpus, args, result)
            wrote = (len(result.read_text().splitlines()) if result.exists() else 0) > before
            if rc != 0 and wrote:  # seen in ~1 of 10 CPU/gloo runs: an abort at interpreter exit, cause unknown
                print(f"note: {job} on {gpus} exited with {rc} after its row was written; the row is kept")
            elif rc != 0:
                failed.append(f"{job} on {gpus}")
    rows = [json.loads(line) for line in result.read_text().splitlines()] if result.exists() else []
    report(rows)
    print(f"rows: {result} ({time.strftime('%Y-%m-%d')})")
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
