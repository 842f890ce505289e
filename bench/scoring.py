"""PPO's scoring phase: the RM's scores and the values from one mixed-adapter forward per chunk (what ppo runs,
ppo.rm_scores_and_values) against the two forwards apart (reward adapter, then value adapter), on one rollout
of the policy. Prints ms per rollout batch, median of --reps, and the ratio. Then the reference pass
(ppo.logprobs_and_kl) without and with the KL --stop-kl reads: from one more policy forward (no gradient; ppo
on a recomputed or static-decoded rollout), and from the sampling loop's logits (ppo's default on CPU).

    .venv/bin/python bench/scoring.py --policy runs/align/sft --reward runs/align/concise/rm [--rollouts 16] [--chunk 8]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instructcli import batches, data, generate, models, ppo, sources, tokens
from instructcli.config import ModelConfig
from instructcli.models import POLICY, REWARD, VALUE


def apart(nets, ro, pad_id, chunk):
    """The scoring phase before: the reward adapter's forward, then the value adapter's."""
    device = ro.tokens.device
    seqs = [q + r for q, r in zip(ro.queries, ro.responses)]
    scores = torch.zeros(len(seqs), device=device)
    nets.use(REWARD)
    for rows in batches.length_chunks([len(x) for x in seqs], chunk):
        b = batches.collate_sequences([seqs[i] for i in rows], pad_id)
        starts = torch.tensor([len(ro.queries[i]) for i in rows], device=device)
        scores[rows] = nets.reward.score(b["input_ids"].to(device), b["attention_mask"].to(device), starts)
    values = ppo.over_rollout(ro, chunk, lambda rows: (ppo.response_values(nets, ro, rows, pad_id, device),))[0]
    return scores, values


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--reward", required=True)
    ap.add_argument("--rollouts", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--chunk", type=int, default=8, help="rollouts per forward (ppo's --micro-batch-size)")
    a = ap.parse_args()
    device = models.pick_device()
    src = sources.resolve(a.policy)
    tok = models.load_tokenizer(src)
    nets, _ = models.ppo_models(src, a.reward, ModelConfig(lora_dropout=0.0), device)
    nets.eval()
    rows = data.load("data_samples/prompts.jsonl", "prompts", False, print)
    queries, _ = tokens.encode_prompts(tok, rows, 256)
    queries = queries[:a.rollouts]
    torch.manual_seed(0)
    nets.use(POLICY)
    out, _, _, kept = generate.generate(nets.lm, tok, queries, 1, 1.0, 1.0, a.max_new_tokens, device, logprobs=True,
                                        keep_logits=True)
    ro = ppo.new_rollout(queries, [o[0] for o in out], tok.pad_token_id, device)
    times = {"mixed (ppo)": [], "apart": []}
    with torch.no_grad():
        for rep in range(a.reps + 1):  # the first round warms up
            for name, fn in (("mixed (ppo)", ppo.rm_scores_and_values), ("apart", apart)):
                nets.use(VALUE)
                sync(device)
                t0 = time.perf_counter()
                s, v = fn(nets, ro, tok.pad_token_id, a.chunk)
                sync(device)
                if rep:
                    times[name].append((time.perf_counter() - t0) * 1000)
        s1, v1 = ppo.rm_scores_and_values(nets, ro, tok.pad_token_id, a.chunk)
        s2, v2 = apart(nets, ro, tok.pad_token_id, a.chunk)
    print(f"{a.rollouts} rollouts of {ro.mask.sum(1).mean():.1f} tokens on {device} ({torch.get_num_threads()} threads); "
          f"max |score diff| {float((s1 - s2).abs().max()):.2e}, max |value diff| "
          f"{float(((v1 - v2) * ro.mask).abs().max()):.2e}")
    for k, v in times.items():
        print(f"{k:12s} {statistics.median(v):8.1f} ms  (min {min(v):.1f}, max {max(v):.1f})")
    print(f"apart / mixed: {statistics.median(times['apart']) / statistics.median(times['mixed (ppo)']):.2f}x")

    ref = {"reference only (--stop-kl 0)": (0.0, None), "reference + stop-kl KL, policy forward": (0.7, None),
           "reference + stop-kl KL, loop's logits": (0.7, kept)}
    ref_times = {k: [] for k in ref}
    with torch.no_grad():
        for rep in range(a.reps + 1):
            for name, (temp, logits) in ref.items():
                sync(device)
                t0 = time.perf_counter()
                ppo.over_rollout(ro, a.chunk, lambda rows: ppo.logprobs_and_kl(
                    nets, ro, rows, tok.pad_token_id, device, 1.0, False, temp, logits))
                sync(device)
                if rep:
                    ref_times[name].append((time.perf_counter() - t0) * 1000)
    with torch.no_grad():
        kl = [ppo.over_rollout(ro, a.chunk, lambda rows: ppo.logprobs_and_kl(
            nets, ro, rows, tok.pad_token_id, device, 1.0, False, 0.7, logits))[-1] for logits in (None, kept)]
    print(f"stop-kl KL per rollout, policy forward vs loop's logits: max |diff| "
          f"{float(((kl[0] - kl[1]) * ro.mask).sum(1).abs().max()):.2e} nats")
    for k, v in ref_times.items():
        print(f"{k:40s} {statistics.median(v):8.1f} ms  (min {min(v):.1f}, max {max(v):.1f})")


if __name__ == "__main__":
    main()
