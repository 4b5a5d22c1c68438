#!/usr/bin/env bash
# What the next device session should run first, each part one device call of under 10 minutes:
#   part 24 (next): what session 30 could not run (no device left): the graph GPU tests on the final WideNorm code,
#           then WideNorm at a small, host-bound batch (1B, 1 x 512: graphed_layers with the "norm copied" A/B,
#           eager and graphed rows; WideNorm adds ~35 us of host time a norm), then train_gpu's 8B lorakit row
#           alone (its peak was 22.5 GiB after PEFT's rows on the same model, against 22.26 in graphed_layers);
#   part 23: the table on the machine: train_gpu.py (floor, PEFT's three settings, lorakit's
#           rows) on 1B with 2 rounds and a profile, then on 8B with checkpointing;
#   part 22: the norms writing into the shared-input ops' widened inputs (blocks.WIDE_NORM, session 30): the
#           GPU tests of blocks and graphs, then graphed_layers on 8B and 1B against the variant without it
#           (eager and graphed rows);
#   part 14: the final norm checkpointed on the last replay's output (graphs.CHECKPOINT_FINAL_NORM, on by
#           default since session 25): the graph tests, then graphed_layers on 8B against the variant without it,
#           graph_memory on 8B. Session 25 ran it: 8B graphed peak 22.23 GiB (timed steps) against 22.30 without,
#           under the allowance (22.28-22.29), 0.959-0.965 of the eager floor; GPU tests 72 passed;
#   part 17: the SiLU backward in place (gated_mlp.IN_PLACE_BACKWARD, session 27): its GPU tests, then
#           graphed_layers --liger on 8B and 1B with the variant without it (eager and graphed rows);
#   part 18: the same A/B on the plain floor (8B, 1B);
#   part 21 (next): where lorakit's step loses on the 1B liger floor (graphed 0.876 in session 27): one profiled
#           step of each, the kernels' extra GPU ms (train_gpu --only liger --liger --profile), 1B then 8B;
#   part 20: session 27's closing figures (SiLU backward in place, 2048-element SiLU programs): graphed_layers on
#           8B and 1B, plain and liger floors, 3 rounds each;
#   part 19: the 1-D SiLU kernels' (elements a program, warps) swept at 8B and 1B against liger's (silu_blocks.py);
#   part 16: part 15's liger rows again after the registry fix, graphed_layers --liger (8B, 1B), graph/block tests;
#   part 15: lorakit on the liger floor: GPU vs wall time of a profiled step, A/B rows (train_gpu --liger-variants);
#   part 13: graphs on the lowered floor (lorakit.fast / liger): the graph tests, graphed_layers --liger on 8B and
#           1B, a GPU-time profile of the liger rows, graph_memory --liger. Session 22 ran all but the last after
#           the output-flags fix (graphed lorakit 0.839 / 0.868 of the liger floor); its earlier run without the
#           fix and without the tests and profile (files ..._s22_run2b_*) replayed nothing;
#   part 11: where the graphed 8B step's reserved memory goes, with and without expandable segments (session 22:
#           the graph pool's 1.2-1.3 GiB of temporaries);
#   part 9 (first, the default): the graph tests, then graphed_layers on 8B (3 rounds) and 1B (4 rounds). Session
#           21's last edit (graphs.FOLD_FINAL_NORM off by default; its GPU test turns it on) has not run on a GPU:
#           check the tests first. Session 21 measured graphed lorakit at 0.963-0.970 (8B) and 0.951-0.959 (1B) of
#           the eager floor, 8B allocated peak 22.30 GiB (0.00-0.02 over the allowance: the input-gradient buffer),
#           reserved 1.9-2.0 GiB over the eager floor's; part 10 A/Bs the folded norm; next: the graph pool's
#           reserved overhead (the head and loss cannot reuse the pool's temporaries);
#   part 7 (first): session 20's run (q/k/v shared on by default: graphed lorakit 0.950-0.957 of the eager floor on
#           1B, 0.964-0.968 on 8B; one set of gradient buffers in graphs.py; bench/graph_memory.py --labels: three
#           hidden-sized tensors of the graphed 8B step not identified yet); next: find those (the 8B graphed
#           allocated peak is 0.2-0.3 GiB over the allowance) and the graphs' reserved overhead (1.5-2.0 GiB even
#           for the floor);
#   part 6: the GPU tests of the fused blocks and of graph_layers, then bench/graphed_layers.py on 1B and
#           on 8B with checkpointing (last measured 2026-12-02, session 19, H200, shared_input.STRIDED_GRAD_X on:
#           lorakit graphed 0.943 / 0.950 of the eager floor on 1B, 0.957 on 8B; the folded SiLU backward kernels
#           (gated_mlp.FUSED_DH_LORA / FUSED_DA_LORA, bench/silu_lora_tiles.py) measured and left off; docs/speed.md
#           "The shared-input op's last dX pass"); lorakit train eager vs --cuda-graphs: bash bench/trainer_graphs.sh;
#           the device's machine is released after 30 s idle: put a session's runs into as few calls as fit;
#   part 1: the GPU tests of the fused blocks, the interleaved A/B of the fused blocks (bench/ab_block.py: the
#           default gate/up shared op, + q/k/v, + q/k/v with the GEMM orders measured (gemm_choice: its split
#           backward avoids the widened N that may make the q/k/v group slow), down op only), then the 1B rows;
#           last measured 2026-12-02 on an H200 (docs/speed.md "Where a LoRA step waits": the fused modes within
#           noise of each other, 0.84-0.92 of the floor's wall time, 0.93 of its GPU kernel time);
#           then the 1B rows with the GEMMs of one step by shapes (train_gpu --profile-shapes);
#           where the GPU waits on the host: python bench/step_gaps.py (--grad-ckpt --batch 2 --shape llama-8b),
#           python bench/dispatch_cost.py, bench/op_cost.py, bench/layer_host_cost.py;
#   part 5: the same profile of the 8B shape (batch 2, gradient checkpointing);
#   part 2: serving with an NF4 base next to the 16-bit one, and `lorakit compare --fast` (lora, qlora) on 1B
#           (not run yet: the machine stopped answering);
#   part 3: the 8-bit base with the one-pass Triton int8 dequantization vs PEFT + bnb (done 2026-11-23, H200);
#   part 4 (nvidia-h200-x2): FSDP2 + QLoRA with the codes inside the decoder-layer units (one all-gather per
#           block; measured before: 1.03 s/step on 2 GPUs vs 0.58 on 1) and the fused head + loss (now the
#           trainer's default), then DDP again, then the loss step alone (plain / chunked / fused) at 8B's head.
#   QLoRA (issue 3) as measured on 2026-12-01: bench/qlora.py (default rows) and bench/qlora.py --check.
# Run from the repository root through the device tool, with the wheels carried (liger-kernel 0.8.5 is in .whl;
# bitsandbytes 0.50.2 for py3.12 is 43 MB: keep it in an ignored folder such as .devwhl and carry that):
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; bash bench/gpu_next.sh 6
set -u
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-.}
part=${1:-9}
if [ "$part" = 17 ]; then
    timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_kernels_swiglu.py 2>&1 | tail -3 \
        | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 260 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --liger --variants "fresh SiLU grads" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_8b_liger.txt" \
        | tail -8)
    (cd bench && timeout $((590 - SECONDS)) python3 graphed_layers.py --shape llama-1b --liger \
        --variants "fresh SiLU grads" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_1b_liger.txt" | tail -8)
elif [ "$part" = 21 ]; then
    (cd bench && timeout 280 python3 train_gpu.py --shape llama-1b --only liger --liger --profile --steps 6 \
        --warmup 3 --rounds 2 2>&1 | grep -v Warn > "$OUT/train_1b_liger.txt"; \
        grep -A8 "^llama" "$OUT/train_1b_liger.txt"; grep "wall time\|GPU time" "$OUT/train_1b_liger.txt")
    (cd bench && timeout $((585 - SECONDS)) python3 train_gpu.py --shape llama-8b --batch 2 --grad-ckpt --only liger \
        --liger --profile --steps 6 --warmup 3 --rounds 2 2>&1 | grep -v Warn > "$OUT/train_8b_liger.txt"; \
        grep -A8 "^llama" "$OUT/train_8b_liger.txt"; grep "wall time\|GPU time" "$OUT/train_8b_liger.txt")
elif [ "$part" = 24 ]; then
    timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -2 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 200 python3 graphed_layers.py --shape llama-1b --batch 1 --seq 512 --rounds 3 \
        --variants "norm copied" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_1b_b1_s512.txt" | tail -8)
    (cd bench && timeout $((585 - SECONDS)) python3 train_gpu.py --shape llama-8b --batch 2 --grad-ckpt \
        --only floor,lorakit --steps 6 --warmup 3 2>&1 | grep -v Warn > "$OUT/train_8b_lorakit.txt"; \
        grep -A8 "^llama" "$OUT/train_8b_lorakit.txt")
elif [ "$part" = 23 ]; then
    (cd bench && timeout 300 python3 train_gpu.py --shape llama-1b --only floor,peft,lorakit --rounds 2 --profile \
        2>&1 | grep -v Warn > "$OUT/train_1b.txt"; grep -A12 "^llama" "$OUT/train_1b.txt")
    (cd bench && timeout $((585 - SECONDS)) python3 train_gpu.py --shape llama-8b --batch 2 --grad-ckpt \
        --only floor,peft,lorakit --steps 6 --warmup 3 2>&1 | grep -v Warn > "$OUT/train_8b.txt"; \
        grep -A12 "^llama" "$OUT/train_8b.txt")
elif [ "$part" = 22 ]; then
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_blocks.py tests/test_graphs.py 2>&1 | tail -3 \
        | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 250 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --variants "norm copied" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -8)
    (cd bench && timeout $((590 - SECONDS)) python3 graphed_layers.py --shape llama-1b \
        --variants "norm copied" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_1b.txt" | tail -8)
elif [ "$part" = 20 ]; then
    for liger in "" "--liger"; do
        tag=${liger:+_liger}
        (cd bench && timeout 140 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 \
            --steps 6 --rounds 3 $liger 2>&1 | grep -v Warn | tee "$OUT/graphed_8b$tag.txt" | tail -5)
        (cd bench && timeout 130 python3 graphed_layers.py --shape llama-1b --rounds 3 $liger 2>&1 | grep -v Warn \
            | tee "$OUT/graphed_1b$tag.txt" | tail -5)
    done
elif [ "$part" = 19 ]; then
    (cd bench && timeout 150 python3 silu_blocks.py --shape llama-8b 2>&1 | grep -v Warn | tee "$OUT/silu_8b.txt")
    (cd bench && timeout 150 python3 silu_blocks.py --shape llama-1b 2>&1 | grep -v Warn | tee "$OUT/silu_1b.txt")
elif [ "$part" = 18 ]; then
    (cd bench && timeout 280 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --variants "fresh SiLU grads" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -8)
    (cd bench && timeout $((590 - SECONDS)) python3 graphed_layers.py --shape llama-1b \
        --variants "fresh SiLU grads" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_1b.txt" | tail -8)
elif [ "$part" = 16 ]; then
    # session 26, after the registry fix (the fused MLP block now also applies on the liger floor): the liger rows
    # again, graphed and eager, then the A/B rows and a profile, then the graph GPU tests
    (cd bench && timeout 200 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --liger 2>&1 | grep -v Warn | tee "$OUT/graphed_8b_liger.txt" | tail -6)
    (cd bench && timeout 130 python3 graphed_layers.py --shape llama-1b --liger 2>&1 | grep -v Warn \
        | tee "$OUT/graphed_1b_liger.txt" | tail -6)
    (cd bench && timeout 150 python3 train_gpu.py --shape llama-8b --batch 2 --grad-ckpt --only liger --liger \
        --liger-variants --profile --steps 6 --warmup 3 --rounds 2 2>&1 | grep -v Warn > "$OUT/train_8b_liger.txt"; \
        grep -A8 "^llama" "$OUT/train_8b_liger.txt"; grep "wall time\|GPU time" "$OUT/train_8b_liger.txt")
    if [ "$SECONDS" -lt 400 ]; then
        timeout $((590 - SECONDS)) python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_blocks.py \
            2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
    fi
elif [ "$part" = 15 ]; then
    # session 26: where lorakit's step on the liger floor loses (8B: +58 ms over that floor against +19 over the
    # plain one): GPU time and wall time of one profiled step, and the A/B rows without the MLP block / shared ops
    (cd bench && timeout 330 python3 train_gpu.py --shape llama-8b --batch 2 --grad-ckpt --only liger --liger \
        --liger-variants --profile --steps 6 --warmup 3 --rounds 2 2>&1 | grep -v Warn > "$OUT/train_8b_liger.txt"; \
        grep -A8 "^llama" "$OUT/train_8b_liger.txt"; grep "wall time\|GPU time" "$OUT/train_8b_liger.txt")
    (cd bench && timeout $((585 - SECONDS)) python3 train_gpu.py --shape llama-1b --only liger --liger \
        --liger-variants --profile --steps 6 --warmup 3 --rounds 2 2>&1 | grep -v Warn > "$OUT/train_1b_liger.txt"; \
        grep -A8 "^llama" "$OUT/train_1b_liger.txt"; grep "wall time\|GPU time" "$OUT/train_1b_liger.txt")
elif [ "$part" = 14 ]; then
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_train_loop.py -k graph 2>&1 \
        | tail -3 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 240 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --rounds 2 --variants "norm not checkpointed" 2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -7)
    if [ "$SECONDS" -lt 420 ]; then
        (cd bench && timeout $((580 - SECONDS)) python3 graph_memory.py --shape llama-8b --batch 2 --grad-ckpt \
            2>&1 | grep -v Warn | tee "$OUT/graph_memory_8b.txt" | tail -12)
    fi
elif [ "$part" = 13 ]; then
    # session 22: graphs on the lowered floor, now that calls with output_attentions=False replay (liger's forward
    # passes it); then where lorakit's step on that floor spends its extra GPU time (1B, one profiled step each)
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 200 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --liger 2>&1 | grep -v Warn | tee "$OUT/graphed_8b_liger.txt" | tail -6)
    (cd bench && timeout 150 python3 graphed_layers.py --shape llama-1b --liger 2>&1 | grep -v Warn \
        | tee "$OUT/graphed_1b_liger.txt" | tail -6)
    (cd bench && timeout 200 python3 train_gpu.py --shape llama-1b --only floor,liger --liger --profile --steps 6 \
        --warmup 3 2>&1 | grep -v Warn > "$OUT/train_gpu_1b_liger_profile.txt"; tail -45 "$OUT/train_gpu_1b_liger_profile.txt")
    (cd bench && timeout 150 python3 graph_memory.py --shape llama-8b --batch 2 --grad-ckpt --liger 2>&1 \
        | grep -v Warn | tee "$OUT/graph_memory_8b_liger.txt" | tail -4)
elif [ "$part" = 11 ]; then
    # session 22: where the graphed step's reserved memory goes (each pool's allocated and free bytes), and the
    # same with the caching allocator's expandable segments (less fragmentation in the general pool)
    (cd bench && timeout 150 python3 graph_memory.py --shape llama-8b --batch 2 --grad-ckpt 2>&1 \
        | grep -v Warn | tee "$OUT/graph_memory_8b.txt" | tail -4)
    export PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
    (cd bench && timeout 150 python3 graph_memory.py --shape llama-8b --batch 2 --grad-ckpt 2>&1 \
        | grep -v Warn | tee "$OUT/graph_memory_8b_expandable.txt" | tail -4)
    (cd bench && timeout 150 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        2>&1 | grep -v Warn | tee "$OUT/graphed_8b_expandable.txt" | tail -6)
    (cd bench && timeout 120 python3 graphed_layers.py --shape llama-1b 2>&1 | grep -v Warn \
        | tee "$OUT/graphed_1b_expandable.txt" | tail -6)
elif [ "$part" = 10 ]; then
    # session 21's third run: the final norm folded into the checkpointed last layer's graphs, A/B on 8B
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_train_loop.py -k graph 2>&1 \
        | tail -3 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 240 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --variants "norm not folded" 2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -8)
    (cd bench && timeout 150 python3 graph_memory.py --shape llama-8b --batch 2 --grad-ckpt 2>&1 \
        | grep -v Warn | tee "$OUT/graph_memory_8b.txt" | tail -14)
elif [ "$part" = 9 ]; then
    # session 21's second run: the graph tests again (the feed test fixed), then more rounds of 8B and 1B
    timeout 200 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_train_loop.py -k graph 2>&1 \
        | tail -3 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 200 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --rounds 3 2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -7)
    (cd bench && timeout 200 python3 graphed_layers.py --shape llama-1b --rounds 4 2>&1 | grep -v Warn \
        | tee "$OUT/graphed_1b.txt" | tail -7)
elif [ "$part" = 8 ]; then
    # session 21: the capture stream's cuBLAS workspaces as graph temporaries, the embedding writing into layer
    # 0's static input, a checkpointed last layer's output in the input-gradient buffer; the graph tests, floor
    # and lorakit on 8B, where the 8B graphed step's memory goes, then 1B if there is time left
    timeout 150 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_train_loop.py -k "graph" \
        2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 220 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -8)
    (cd bench && timeout 150 python3 graph_memory.py --shape llama-8b --batch 2 --grad-ckpt --labels 2>&1 \
        | grep -v Warn | tee "$OUT/graph_memory_8b.txt" | tail -50)
    if [ "$SECONDS" -lt 400 ]; then
        (cd bench && timeout $((560 - SECONDS)) python3 graphed_layers.py --shape llama-1b --rounds 2 2>&1 \
            | grep -v Warn | tee "$OUT/graphed_1b.txt" | tail -7)
    fi
elif [ "$part" = 7 ]; then
    # session 20: q/k/v shared on by default (blocks.SHARED_QKV); graphs with one set of parameter-gradient buffers
    # and one cos / sin; where graph memory goes (bench/graph_memory.py --stacks); the default against gate/up only,
    # eager and graphed, in the same rounds
    X=""; python3 -c "import xdist" 2>/dev/null && X="-n 4"
    timeout 150 python3 -m pytest -q -p no:cacheprovider $X tests/test_blocks.py tests/test_kernels_swiglu.py \
        tests/test_kernels_lora_linear.py tests/test_graphs.py tests/test_compile.py tests/test_train_loop.py 2>&1 \
        | tail -2 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 150 python3 graph_memory.py --shape llama-8b --batch 2 --grad-ckpt --stacks 2>&1 \
        | grep -v Warn | tee "$OUT/graph_memory_8b.txt" | tail -60)
    (cd bench && timeout 170 python3 graphed_layers.py --shape llama-1b --rounds 3 --variants "gate/up only" \
        --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_1b.txt" | tail -8)
    (cd bench && timeout 200 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --variants "gate/up only" --eager-variants 2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -8)
elif [ "$part" = 6 ]; then
    X=""; python3 -c "import xdist" 2>/dev/null && X="-n 4"
    timeout 150 python3 -m pytest -q -p no:cacheprovider $X tests/test_blocks.py tests/test_kernels_swiglu.py \
        tests/test_kernels_lora_linear.py tests/test_graphs.py tests/test_compile.py tests/test_train_loop.py 2>&1 \
        | tail -2 \
        | tee "$OUT/gpu_tests.txt"
    # q/k/v as one shared-input op, graphed (measured eagerly only: blocks.SHARED_QKV); ~80 s and ~90 s
    (cd bench && timeout 150 python3 graphed_layers.py --shape llama-1b --rounds 3 --variants "shared q/k/v" 2>&1 \
        | grep -v Warn | tee "$OUT/graphed_1b.txt" | tail -7)
    (cd bench && timeout 200 python3 graphed_layers.py --shape llama-8b --batch 2 --grad-ckpt --warmup 3 --steps 6 \
        --variants "shared q/k/v" \
        2>&1 | grep -v Warn | tee "$OUT/graphed_8b.txt" | tail -7)
elif [ "$part" = 1 ]; then
    X=""; python3 -c "import xdist" 2>/dev/null && X="-n 4"
    timeout 120 python3 -m pytest -q -p no:cacheprovider $X tests/test_blocks.py tests/test_kernels_swiglu.py \
        tests/test_kernels_lora_linear.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
    (cd bench && timeout 150 python3 ab_block.py --rounds 3 --steps 8 \
        --modes "gate/up shared,shared-input ops,+ q/k/v, measured,down op only" 2>&1 | grep -v Warn | tail -12 \
        | tee "$OUT/ab.txt")
    (cd bench && timeout 200 python3 train_gpu.py --shape llama-1b --only floor,lorakit --steps 8 --profile \
        --profile-shapes 2>&1 | grep -v Warn | tee "$OUT/train_1b_profile.txt" | tail -12)
elif [ "$part" = 5 ]; then
    (cd bench && timeout 500 python3 train_gpu.py --shape llama-8b --batch 2 --grad-ckpt --only floor,lorakit \
        --steps 6 --warmup 2 --profile --profile-shapes 2>&1 | grep -v Warn | tee "$OUT/train_8b_profile.txt" \
        | tail -12)
elif [ "$part" = 2 ]; then
    (cd bench && timeout 240 python3 serve.py --only lorakit,nf4 2>&1 | tail -9 | tee "$OUT/serve_nf4.txt")
    timeout 300 python3 -m lorakit compare --model-config llama-1b --device cuda --dtype bf16 \
        --batch-size 4 --seq-len 2048 --steps 10 --r 16 --alpha 32 \
        --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj --methods lora,qlora --fast \
        --output-dir /tmp/cmp_fast 2>&1 | tail -8 | tee "$OUT/compare_fast.txt"
elif [ "$part" = 4 ]; then
    export OMP_NUM_THREADS=8
    timeout 300 python3 bench/multi_gpu.py --only fsdp-qlora,fsdp-qlora-global --steps 6 --warmup 2 2>&1 \
        | grep -E "^(job|fsdp|ddp|rows)" | tee "$OUT/multi_fsdp.txt"
    timeout 150 python3 bench/multi_gpu.py --only ddp 2>&1 | grep -E "^(job|fsdp|ddp|rows)" | tee "$OUT/multi_ddp.txt"
    timeout 100 python3 bench/loss_memory.py --device cuda --vocab 128256 --hidden 4096 --batch 2 --seq 2048 \
        --dtype bf16 2>&1 | tail -6 | tee "$OUT/loss_memory.txt"
else
    (cd bench && timeout 400 python3 qlora.py --only peft_int8,lorakit_int8,lorakit --steps 8 --warmup 3 2>&1 \
        | tail -7 | tee "$OUT/qlora_int8.txt")
fi
