"""What computing the LM head only where a token is predicted saves, on the embedded model (issue 8).

    python bench/lm_head.py [--model default] [--batch 4] [--reps 5]

SFT: forward + backward of one micro-batch of data_samples/demonstrations.jsonl, full logits
(rlhf.lm_loss_sum(model(...).logits)) vs forward.lm_loss_sum (labelled positions only). PPO: log-probs of 48
response tokens after a ~96-token prompt, full logits vs logits_to_keep. The two variants alternate in one
process, so machine load hits both alike; prints medians and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from instructcli import batches, data, forward, models, rlhf, sources, tokens
from instructcli.config import ModelConfig


def timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def lora_model(name: str):
    """`name` (the embedded model by default) with a fresh LoRA adapter and no dropout, on CPU, as sft and ppo
    train it; and its tokenizer. Seeded, so the adapter is the same each run."""
    torch.manual_seed(0)
    src = sources.resolve(name)
    return models.load_tokenizer(src), models.trainable_model(src, ModelConfig(lora_dropout=0.0), "cpu")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--reps", type=int, default=5)
    a = ap.parse_args()
    tok, model = lora_model(a.model)
    model.config.use_cache = False
    rows = data.load("data_samples/demonstrations.jsonl", "demonstrations").records[:a.batch]
    batch = batches.collate([tokens.encode_demonstration(tok, r.messages) for r in rows], tok.pad_token_id)
    ids, attn, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]

    def sft_full():
        loss, n = rlhf.lm_loss_sum(model(input_ids=ids, attention_mask=attn).logits, labels)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)

    def sft_selected():
        loss, n = forward.lm_loss_sum(model, ids, attn, labels)
        (loss / n).backward()
        model.zero_grad(set_to_none=True)

    P, R = 96, 48
    q = torch.randint(100, 40000, (8, P + R))

    def ppo_full():
        out = model(input_ids=q).logits[:, P - 1:-1]
        rlhf.logprobs_from_logits(out, q[:, P:]).sum().backward()
        model.zero_grad(set_to_none=True)

    def ppo_kept():
        out = model(input_ids=q, logits_to_keep=R + 1).logits[:, :-1]
        rlhf.logprobs_from_logits(out, q[:, P:]).sum().backward()
        model.zero_grad(set_to_none=True)

    share = float((rlhf.shift_labels(labels) != rlhf.IGNORE_INDEX).sum() / attn.sum())
    print(f"model {a.model}, SFT batch {a.batch} x {ids.shape[1]} tokens ({share:.0%} of real tokens labelled); "
          f"PPO 8 x ({P} prompt + {R} response)")
    for name, base, new in (("sft step", sft_full, sft_selected), ("ppo log-probs", ppo_full, ppo_kept)):
        base(), new()  # warm-up
        t_base, t_new = [], []
        for _ in range(a.reps):
            t_base.append(timed(base))
            t_new.append(timed(new))
        mb, mn = statistics.median(t_base), statistics.median(t_new)
        print(f"{name:14s} full logits {mb:.3f} s (spread {min(t_base):.3f}-{max(t_base):.3f}), "
              f"selected {mn:.3f} s (spread {min(t_new):.3f}-{max(t_new):.3f}): {mb / mn:.2f}x faster")


if __name__ == "__main__":
    main()
