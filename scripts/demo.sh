#!/usr/bin/env bash
# The README's main command: the whole recipe on the embedded model and data_samples/:
# sft -> sample K per prompt -> rm -> ppo with ptx -> sample from the PPO policy, with rewards before/after.
# Sizes are environment variables (defaults fit about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=${DEMO_OUT:-runs/demo}
SFT_STEPS=${DEMO_SFT_STEPS:-30}      # sft optimizer steps of 4 demonstrations
PROMPTS=${DEMO_PROMPTS:-8}           # held-out prompts sampled before and after PPO
K=${DEMO_K:-2}                       # samples per prompt
NEW_TOKENS=${DEMO_NEW_TOKENS:-48}
RM_STEPS=${DEMO_RM_STEPS:-12}        # rm optimizer steps of 4 rankings (K = 4)
PPO_STEPS=${DEMO_PPO_STEPS:-4}       # ppo iterations of 8 rollouts
PPO_BATCH=${DEMO_PPO_BATCH:-8}
mkdir -p "$OUT"
start=$(date +%s)
# data_samples/prompts.jsonl drives PPO; a few held-out prompts show the policy before and after
tail -n "$PROMPTS" data_samples/prompts_heldout.jsonl > "$OUT/heldout_prompts.jsonl"

echo "== 1. sft: $SFT_STEPS steps on data_samples/demonstrations.jsonl" >&2
instruct sft data_samples/demonstrations.jsonl -o "$OUT/sft" --max-steps "$SFT_STEPS" -b 4 \
  --eval-every 10 --save-every 10 --overwrite >/dev/null

echo "== 2. sample: $K responses to each of $PROMPTS held-out prompts" >&2
instruct sample "$OUT/sft" -p "$OUT/heldout_prompts.jsonl" -n "$K" --max-new-tokens "$NEW_TOKENS" \
  -o "$OUT/samples_sft.jsonl" >/dev/null

echo "== 3. rm: $RM_STEPS steps on data_samples/comparisons.jsonl, from the sft model" >&2
instruct rm data_samples/comparisons.jsonl --from "$OUT/sft" -o "$OUT/rm" --max-steps "$RM_STEPS" \
  --max-len 256 --eval-every 6 --overwrite >/dev/null

echo "== 4. ppo with ptx: $PPO_STEPS steps of $PPO_BATCH rollouts, kl 0.02, ptx-coef 27.8" >&2
instruct ppo --policy "$OUT/sft" --reward "$OUT/rm" -p data_samples/prompts.jsonl \
  --ptx-data data_samples/pretrain.jsonl --kl 0.02 --ptx-coef 27.8 --steps "$PPO_STEPS" \
  --rollout-batch-size "$PPO_BATCH" --mini-batch-size "$PPO_BATCH" --ppo-epochs 1 \
  --max-new-tokens "$NEW_TOKENS" -o "$OUT/ppo" --overwrite >/dev/null

echo "== 5. sample from the PPO policy and score both sample sets" >&2
instruct sample "$OUT/ppo" -p "$OUT/heldout_prompts.jsonl" -n "$K" --max-new-tokens "$NEW_TOKENS" \
  -o "$OUT/samples_ppo.jsonl" >/dev/null
instruct score "$OUT/rm" "$OUT/samples_sft.jsonl" -o "$OUT/scored_sft.jsonl" -q >/dev/null
instruct score "$OUT/rm" "$OUT/samples_ppo.jsonl" -o "$OUT/scored_ppo.jsonl" -q >/dev/null

echo "== done in $(( $(date +%s) - start )) s" >&2
python - "$OUT" <<'PY'
import json, statistics, sys
out = sys.argv[1]
def mean_score(name):
    return statistics.mean(s for line in open(f"{out}/{name}") for s in json.loads(line)["scores"])
sft = json.load(open(f"{out}/sft/instruct.json"))["metrics"]
rm = json.load(open(f"{out}/rm/instruct.json"))["metrics"]
ppo = json.load(open(f"{out}/ppo/instruct.json"))["metrics"]
print(f"sft:  {out}/sft   final loss {sft['loss']:.3f}, held-out loss {sft.get('eval_loss', float('nan')):.3f}")
print(f"rm:   {out}/rm    held-out pairwise accuracy {rm.get('eval_accuracy', float('nan')):.3f}")
print(f"ppo:  {out}/ppo   last rollout: score {ppo['score']:.3f}, KL to sft {ppo['kl']:.3f} nats/response")
print(f"samples: {out}/samples_sft.jsonl, {out}/samples_ppo.jsonl (scored: {out}/scored_*.jsonl)")
print(f"mean reward on held-out prompts: sft {mean_score('scored_sft.jsonl'):+.3f} -> ppo {mean_score('scored_ppo.jsonl'):+.3f}")
row = json.loads(open(f"{out}/samples_ppo.jsonl").readline())
print(f"first prompt: {row['prompt']}\nppo answer:   {row['responses'][0][:300]}")
PY
