#!/usr/bin/env bash
# lorakit train on the 1B shape (synthetic rows, bf16 base, fp32 adapters under autocast), eager and with
# --cuda-graphs: median step time of steps 5-16, peak memory, the first losses and the replay counts.
# Run from the repository root on a CUDA machine: bash bench/trainer_graphs.sh (writes into $OUT or .)
OUT=${OUT:-.}
export PYTHONPATH=$PWD/src:$PWD/tests:$PWD/bench PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
timeout 150 python3 -m pytest -q -p no:cacheprovider -n 2 tests/test_graphs.py tests/test_train_loop.py -k "graph" 2>&1 | grep -v Loading | tail -20 > $OUT/gpu_tests.txt; tail -3 $OUT/gpu_tests.txt
for g in eager graphs; do
  flag=""; [ $g = graphs ] && flag="--cuda-graphs"
  timeout 200 python3 -m lorakit train --model-config llama-1b --device cuda --dtype bf16 --batch-size 4 --seq-len 2048 \
    --max-steps 16 --r 16 --alpha 32 --target-modules q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj \
    --no-progress --no-plot --no-checkpoints --save-every 0 --output-dir /tmp/t_$g $flag 2>&1 | grep -v Warn | tail -4 > $OUT/train_$g.txt
  python3 - $g <<'PY' | tee -a $OUT/train_summary.txt
import json, statistics, sys
g = sys.argv[1]
rec = [json.loads(l) for l in open(f"/tmp/t_{g}/metrics.jsonl") if '"step_time_s"' in l]
times = [r["step_time_s"] for r in rec if r["step"] > 4]
s = json.load(open(f"/tmp/t_{g}/summary.json"))
print(g, "median step s (steps 5-16):", round(statistics.median(times), 4), "tokens/s:", round(8192 / statistics.median(times)),
      "peak MiB:", s["peak_memory_mb"], "losses:", [round(r["loss"], 4) for r in rec][:6], "replays:", s.get("graphed_layer_calls"), s.get("eager_layer_calls"))
PY
done
cat $OUT/train_graphs.txt
