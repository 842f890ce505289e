#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one go (one lease of a GPU machine, ~8 min on an H200):
#   1. PPO on a 7B-shaped Llama (random weights, bf16, LoRA r 16), 16 rollouts x 256 new tokens, mini-batch 4:
#      instruct (one shared base; an rm run of 1 step as its reward) against TRL 1.12.0's PPOTrainer
#      (bench/peer_trl_ppo.py: policy, reward and value as separate models);
#   2. the decode step at the 7B shape, batch 16, eager against the captured static step (bench/rollout.py
#      --decode-step), bf16 and 4-bit; rollouts: instruct's eager and static loops against plain generate
#      (bench/rollout.py), 1B shape, bf16;
#   3. PPO's scoring phase, reward and value in one mixed-adapter forward against the two apart (bench/scoring.py);
#   4. if time is left: the same PPO pair over a 4-bit base.
# Results land in $OUT (default /tmp/gpu_suite) as JSON/JSONL and logs.
#   bash bench/gpu_suite.sh TOKENIZER_DIR           # PY / PEER_PY: interpreters (default python3)
#   SHAPE=tiny STEPS=2 NEW=8 bash bench/gpu_suite.sh .gpu/tok   # a dry run on a CPU
set -u
TOK=${1:?tokenizer dir}
OUT=${OUT:-/tmp/gpu_suite}; PY=${PY:-python3}; PEER_PY=${PEER_PY:-$PY}
SHAPE=${SHAPE:-7b}; STEPS=${STEPS:-3}; NEW=${NEW:-256}; BATCH=${BATCH:-16}; MB=${MB:-4}; BUDGET=${BUDGET:-560}
mkdir -p "$OUT"; export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
T0=$(date +%s); left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
log() { echo "[$(( $(date +%s) - T0 ))s] $*"; }
M=/tmp/llama_$SHAPE
ours() { $PY -m instructcli "$@"; }
ppo_pair() {  # $1 = tag, $2 = quant (none|8bit|4bit)
  log "instruct ppo ($2)"
  timeout $(( $(left) > 30 ? $(left) - 10 : 20 )) $PY -m instructcli ppo --policy $M --reward /tmp/rm_$SHAPE -p data_samples/prompts.jsonl -o /tmp/ppo_$1 --steps $STEPS \
    --rollout-batch-size $BATCH --mini-batch-size $MB --ppo-epochs 1 --max-new-tokens $NEW --temperature 0.7 \
    --top-p 1.0 --lr 1e-4 --kl 0.02 --ptx-coef 0 --lora-r 16 --lora-alpha 32 --lora-dropout 0.05 --quant $2 \
    --save-every 0 --overwrite -q > "$OUT/ours_$1.log" 2>&1 && cp /tmp/ppo_$1/metrics.jsonl "$OUT/ours_$1.jsonl" \
    && $PY bench/gpu.py summary "$OUT/ours_$1.jsonl" | tee "$OUT/ours_$1.summary.json"
  log "TRL ppo ($2)"
  timeout $(( $(left) > 30 ? $(left) - 10 : 20 )) $PEER_PY bench/peer_trl_ppo.py --model $M \
    --prompts data_samples/prompts.jsonl --steps $STEPS --batch $BATCH --mini-batch $MB --max-new-tokens $NEW \
    --quant $2 --out "$OUT/trl_$1.json" > "$OUT/trl_$1.log" 2>&1
  tail -c 600 "$OUT/trl_$1.json" 2>/dev/null || tail -5 "$OUT/trl_$1.log"
}
$PY - <<'PY' | tee "$OUT/env.json"
import json, torch, transformers, peft
print(json.dumps({"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                  "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}))
PY
log "build $SHAPE"; $PY bench/gpu.py build --shape $SHAPE --tokenizer "$TOK" --out $M
log "rm, 1 step (the reward and value start for instruct)"
ours rm data_samples/comparisons.jsonl -m $M -o /tmp/rm_$SHAPE --max-steps 1 -b 1 --max-len 128 --eval-frac 0 \
  --save-every 0 --overwrite -q > "$OUT/rm.log" 2>&1 || tail -5 "$OUT/rm.log"
log "decode step, $SHAPE bf16, $BATCH rows: eager vs captured (static cache)"
timeout $(( $(left) > 30 ? 90 : 20 )) $PY bench/rollout.py --model $M --decode-step --batch $BATCH --prompt-len 256 \
  2>&1 | grep -v Warning | tee -a "$OUT/decode_step.txt"
ppo_pair bf16 none
if [ "$(left)" -gt 120 ]; then
  log "scoring phase: reward and value in one mixed-adapter forward vs apart"
  timeout 90 $PY bench/scoring.py --policy $M --reward /tmp/rm_$SHAPE --rollouts $BATCH --max-new-tokens $NEW \
    --reps 3 2>&1 | grep -v Warning | tee -a "$OUT/scoring.txt"
fi
if [ "$(left)" -gt 120 ]; then
  log "decode step, $SHAPE 4-bit"
  timeout 90 $PY bench/rollout.py --model $M --quant 4bit --decode-step --batch $BATCH --prompt-len 256 \
    2>&1 | grep -v Warning | tee -a "$OUT/decode_step.txt"
fi
if [ "$(left)" -gt 120 ]; then
  log "rollout bench"
  R1=/tmp/llama_rollout; [ "$SHAPE" = tiny ] && R1=$M || $PY bench/gpu.py build --shape 1b --tokenizer "$TOK" --out $R1
  for args in "--batch $BATCH --n 1" "--batch 4 --n 4"; do
    timeout $(( $(left) > 30 ? $(left) - 10 : 20 )) $PY bench/rollout.py --model $R1 $args \
      --max-new-tokens $NEW --reps 3 2>&1 | grep -v Warning | tee -a "$OUT/rollout.txt"
  done
fi
if [ "$(left)" -gt 200 ]; then ppo_pair nf4 4bit; fi
log "done"
