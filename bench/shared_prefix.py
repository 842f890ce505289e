"""What running a shared prompt prefix once saves (forward.hidden_states), on the embedded model.

    python bench/shared_prefix.py [--model default] [--rows 8] [--new-tokens 40] [--reps 5]

PPO's shapes: `--rows` prompts of data_samples/prompts.jsonl through the chat template (SmolLM2's renders a
24-token system prompt before every user turn), each with `--new-tokens` response tokens, collated as ppo
collates a rollout (prompts left-padded). Timed: the policy's response log-probs with a backward (the update),
and without a gradient (the reference's forward), once with the prefix shared and once with it run in every
row; the two alternate in one process, so the machine's load hits both alike. Prints medians, the fastest, and their ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instructcli import batches, data, forward, rlhf, tokens
from lm_head import lora_model  # bench/, on the path as the script's own folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=40)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    tok, model = lora_model(a.model)
    model.eval()
    prompts = data.load("data_samples/prompts.jsonl", "prompts")
    queries, _ = tokens.encode_prompts(tok, prompts, 256)
    queries = queries[:a.rows]
    responses = torch.randint(100, 40000, (a.rows, a.new_tokens)).tolist()
    ids, attn, pos, start = batches.collate_rollout(queries, responses, tok.pad_token_id)
    k = forward.shared_prefix(ids, attn, pos)
    targets = ids[:, start:]

    def logprobs():
        return rlhf.logprobs_from_logits(forward.logits_from(model, ids, attn, pos, start - 1)[:, :-1], targets)

    def update():
        logprobs().sum().backward()
        model.zero_grad(set_to_none=True)

    def reference():
        with torch.no_grad():
            logprobs()

    on = forward.PREFIX_MIN
    times = {(name, shared): [] for name in ("update", "reference") for shared in (True, False)}
    for rep in range(a.reps + 1):  # the first round warms up
        for shared in (True, False):
            forward.PREFIX_MIN = on if shared else 10 ** 9
            for name, fn in (("update", update), ("reference", reference)):
                t = time.perf_counter()
                fn()
                if rep:
                    times[name, shared].append(time.perf_counter() - t)
    forward.PREFIX_MIN = on
    real = int(attn.sum())
    print(f"{a.rows} rows: prompts {statistics.mean(map(len, queries)):.1f} tokens on average (shared prefix {k}), "
          f"{a.new_tokens} response tokens; {ids.shape[1]} columns, {real} real tokens, {k * (a.rows - 1)} of "
          f"them ({k * (a.rows - 1) / real:.0%}) not run again when shared; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {a.reps}")
    print("| forward | prefix in every row: median (fastest) | prefix once: median (fastest) | ratio of medians (of fastest) |")
    print("|---|---|---|---|")
    for name in ("update", "reference"):
        full, once = times[name, False], times[name, True]
        print(f"| {name} | {statistics.median(full):.3f} s ({min(full):.3f}) | {statistics.median(once):.3f} s "
              f"({min(once):.3f}) | {statistics.median(once) / statistics.median(full):.2f}x "
              f"({min(once) / min(full):.2f}x) |")


if __name__ == "__main__":
    main()
