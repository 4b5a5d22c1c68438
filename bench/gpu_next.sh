#!/usr/bin/env bash
# What the next device session should run first (about 9 minutes on an H100): the GPU tests and timings of
# the work that was only verified on the CPU on 2026-11-23 (the two-launch BGMV expand, 8-bit bases), then
# the serving and QLoRA tables. Run from the repository root through the device tool, with .whl carried:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl; bash bench/gpu_next.sh
set -u
export PYTHONPATH=/tmp/site:$PWD/src:$PWD/tests PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
OUT=${OUT:-.}
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_serve_bgmv.py tests/test_serve_decoder.py \
    tests/test_serve_engine.py tests/test_quant_int8.py tests/test_quant_layers.py 2>&1 | tail -3 | tee "$OUT/gpu_tests.txt"
timeout 90 python3 bench/bgmv_sweep.py 2>&1 | tail -10 | tee "$OUT/bgmv_sweep.txt"
timeout 170 python3 bench/serve.py 2>&1 | tail -14 | tee "$OUT/serve_bench.txt"
timeout 200 python3 bench/qlora.py --only peft_bf16,lorakit,peft_int8,lorakit_int8 --steps 10 --warmup 3 2>&1 \
    | tail -8 | tee "$OUT/qlora_int8.txt"
