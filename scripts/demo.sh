#!/usr/bin/env bash
# The README's main command: the InstructGPT recipe on the embedded model and data_samples/, on-policy as in
# the paper: sft -> sample K answers per prompt from the SFT model -> rank them (a simulated labeler stands in
# for people) -> rm on those rankings -> ppo against the rm -> judge PPO against SFT on held-out prompts with
# the labeler, which PPO never saw. Ends with one before/after table.
# Sizes are environment variables (the defaults fit about 10 minutes on 2 CPU cores).
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${VIRTUAL_ENV:-}" ] || . .venv/bin/activate
export HF_HUB_OFFLINE=1
OUT=${DEMO_OUT:-runs/demo}
SFT_STEPS=${DEMO_SFT_STEPS:-16}      # sft optimizer steps of 4 demonstrations
PROMPTS=${DEMO_PROMPTS:-40}          # training prompts whose SFT answers are ranked
K=${DEMO_K:-4}                       # answers ranked per prompt
NEW_TOKENS=${DEMO_NEW_TOKENS:-48}
RM_EPOCHS=${DEMO_RM_EPOCHS:-2}
PPO_STEPS=${DEMO_PPO_STEPS:-12}      # ppo iterations (instruct ppo: at most 80, ended by a KL budget, --lr 3e-4)
PPO_LR=${DEMO_PPO_LR:-5e-4}          # a higher rate than the default, to move in fewer steps
PPO_BATCH=${DEMO_PPO_BATCH:-8}       # rollouts per iteration
HELDOUT=${DEMO_HELDOUT:-48}          # held-out prompts the judge compares SFT and PPO on
LABELER=${DEMO_LABELER:-data_samples/labeler.py:prefer}
mkdir -p "$OUT"
start=$(date +%s); last=""
stage() {  # each stage's heading, after the seconds the one before it took
  local now; now=$(date +%s)
  [ -z "$last" ] || echo "   ($(( now - last )) s)" >&2
  last=$now; echo "== $*" >&2
}
head -n "$PROMPTS" data_samples/prompts.jsonl > "$OUT/prompts.jsonl"
head -n "$HELDOUT" data_samples/prompts_heldout.jsonl > "$OUT/heldout.jsonl"

stage "1. sft: $SFT_STEPS steps on data_samples/demonstrations.jsonl"
instruct sft data_samples/demonstrations.jsonl -o "$OUT/sft" --max-steps "$SFT_STEPS" -b 4 \
  --eval-every 8 --save-every 0 --overwrite -q >/dev/null

stage "2. sample: $K answers of the SFT model to each of $PROMPTS training prompts"
instruct sample "$OUT/sft" -p "$OUT/prompts.jsonl" -n "$K" --temperature 1.0 --max-new-tokens "$NEW_TOKENS" \
  -o "$OUT/samples.jsonl" -q >/dev/null

stage "3. label: ranked by the simulated labeler $LABELER (10 % adjacent swaps; it stands in for people:" \
  "\`instruct label $OUT/samples.jsonl -o FILE\` lets you rank them yourself)"
rm -f "$OUT/rankings.jsonl" "$OUT/rankings.jsonl.skipped"
instruct label "$OUT/samples.jsonl" -o "$OUT/rankings.jsonl" --judge "$LABELER" --noise 0.1 >/dev/null

stage "4. rm: on those rankings, from the sft model ($RM_EPOCHS epochs)"
instruct rm "$OUT/rankings.jsonl" --from "$OUT/sft" -o "$OUT/rm" --epochs "$RM_EPOCHS" --eval-frac 0 \
  --overwrite -q >/dev/null
# the RM on answers to prompts it never saw: 2 fresh SFT answers per held-out prompt, ranked by the labeler
instruct sample "$OUT/sft" -p "$OUT/heldout.jsonl" -n 2 --temperature 1.0 --max-new-tokens "$NEW_TOKENS" \
  --seed 1 -o - -q | instruct score "$OUT/rm" - -o "$OUT/rm_fresh.jsonl" -q >/dev/null

stage "5. ppo: $PPO_STEPS steps of $PPO_BATCH rollouts against the rm (lr $PPO_LR, kl 0.02, plain PPO)"
instruct ppo --policy "$OUT/sft" --reward "$OUT/rm" -p "$OUT/prompts.jsonl" --ptx-coef 0 --steps "$PPO_STEPS" \
  --lr "$PPO_LR" --kl 0.02 --stop-kl 0 \
  --rollout-batch-size "$PPO_BATCH" --mini-batch-size "$PPO_BATCH" \
  --max-new-tokens "$NEW_TOKENS" -o "$OUT/ppo" --overwrite -q >/dev/null

stage "6. compare: PPO against SFT on $HELDOUT held-out prompts, judged by the labeler (not the rm)"
instruct compare "$OUT/sft" "$OUT/ppo" -p "$OUT/heldout.jsonl" --judge "$LABELER" --max-new-tokens "$NEW_TOKENS" \
  -o "$OUT/compare.jsonl" -q > "$OUT/compare.json"   # with each model's length and PPO's KL to SFT

stage "done in $(( $(date +%s) - start )) s"
python - "$OUT" "$LABELER" <<'PY'
import importlib.util, json, sys
out, labeler = sys.argv[1], sys.argv[2]
path, _, name = labeler.rpartition(":")
spec = importlib.util.spec_from_file_location("labeler", path)
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
judge = getattr(mod, name)
from instructcli.stats import bootstrap_ci
right = []  # one pair per held-out prompt the labeler does not tie: 1 if the RM orders it as the labeler does
for line in open(f"{out}/rm_fresh.jsonl"):
    r = json.loads(line)
    (a, b), (sa, sb) = (judge(r["prompt"], x) for x in r["responses"]), r["scores"]
    if a != b:
        right.append(int((a > b) == (sa > sb)))
pairs, (lo, hi) = len(right), bootstrap_ci(right)  # one pair a prompt: the plain bootstrap over prompts
summary = json.load(open(f"{out}/compare.json"))
cmp, (sft_ans, ppo_ans) = summary["results"][0], summary["answers"]
kl = ppo_ans["kl"]
ppo = json.load(open(f"{out}/ppo/instruct.json"))["metrics"]
print(f"rm accuracy on fresh answers to {summary['prompts']} unseen prompts (by the labeler): "
      f"{sum(right) / max(pairs, 1):.3f} [{lo:.3f}, {hi:.3f}] ({pairs} pairs)")
print(f"| {'':34} | SFT ({out}/sft) | PPO ({out}/ppo) |")
print(f"|{'-' * 36}|---|---|")
print(f"| {'win rate vs SFT, judged by ' + name:34} | — | {cmp['win_rate']:.3f} [{cmp['ci95'][0]:.3f}, {cmp['ci95'][1]:.3f}] "
      f"({cmp['wins']} wins, {cmp['ties']} ties, {cmp['losses']} losses) |")
print(f"| {'KL to SFT (nats per answer)':34} | 0 | {kl['mean']:.2f} [{kl['ci95'][0]:.2f}, {kl['ci95'][1]:.2f}] |")
print(f"| {'answer length (words)':34} | {sft_ans['words']:.1f} | {ppo_ans['words']:.1f} |")
print(f"| {'answers cut off at the token cap':34} | {sft_ans['cut_off']:.0%} | {ppo_ans['cut_off']:.0%} |")
print(f"| {'rm score, last rollouts (RM-judged)':34} | — | {ppo['score']:+.3f} |")
print(f"answers: {out}/compare.jsonl; rankings: {out}/rankings.jsonl")
PY
