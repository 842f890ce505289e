#!/usr/bin/env bash
# The README's main command: the recipe on the embedded model and data_samples/. Sizes are env variables.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=${DEMO_OUT:-runs/demo}
SFT_STEPS=${DEMO_SFT_STEPS:-30}      # optimizer steps of --batch-size 4
PROMPTS=${DEMO_PROMPTS:-8}           # held-out prompts to sample
K=${DEMO_K:-2}                       # samples per prompt
NEW_TOKENS=${DEMO_NEW_TOKENS:-64}
mkdir -p "$OUT"
start=$(date +%s)

echo "== 1. sft: $SFT_STEPS steps on data_samples/demonstrations.jsonl" >&2
instruct sft data_samples/demonstrations.jsonl -o "$OUT/sft" --max-steps "$SFT_STEPS" -b 4 --lr 2e-4 \
  --eval-every 10 --save-every 10 --overwrite

echo "== 2. sample: $K responses to each of $PROMPTS held-out prompts" >&2
head -n "$PROMPTS" data_samples/prompts.jsonl |
  instruct sample "$OUT/sft" -p - -n "$K" --max-new-tokens "$NEW_TOKENS" -o "$OUT/samples.jsonl"

echo "== done in $(( $(date +%s) - start )) s" >&2
echo "sft run dir:   $OUT/sft (adapter, manifest instruct.json, metrics.jsonl)"
echo "samples:       $OUT/samples.jsonl"
python - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
m = json.load(open(f"{out}/sft/instruct.json"))["metrics"]
print(f"sft final loss {m['loss']:.3f}, held-out loss {m.get('eval_loss', float('nan')):.3f}")
row = json.loads(open(f"{out}/samples.jsonl").readline())
print(f"first prompt:  {row['prompt']}\nfirst answer:  {row['responses'][0][:300]}")
PY
