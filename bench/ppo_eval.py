"""Held-out comparison of SFT and PPO policies: mean RM score, KL to SFT, LM loss on held-out text.

    python bench/ppo_eval.py --rm runs/demo/rm --sft runs/demo/sft runs/demo/ppo_plain runs/demo/ppo_ptx \
        --prompts data_samples/prompts.jsonl --skip 100 --text data_samples/lm_heldout.jsonl

Each policy answers the same held-out prompts (sampling at --temperature with --seed); the RM scores every
answer; KL is sum over response tokens of log pi - log pi_SFT (nats per response) on the policy's own answers;
the LM loss is the mean next-token loss on the plain text (the alignment tax). Prints one JSON line per model.
A stop-gap until `instruct eval` exists.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from instructcli import data, models, rlhf
from instructcli.config import ModelConfig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rm", required=True)
    ap.add_argument("--sft", required=True)
    ap.add_argument("policies", nargs="*")
    ap.add_argument("--prompts", default="data_samples/prompts.jsonl")
    ap.add_argument("--skip", type=int, default=100, help="prompts used in training come first")
    ap.add_argument("--text", default="data_samples/lm_heldout.jsonl")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()

    prompts = data.load(a.prompts, "prompts").records[a.skip:]
    texts = data.load(a.text, "pretraining").records
    rm, rm_tok, _ = models.load_reward_model(a.rm, ModelConfig(), "cpu")
    for spec in [a.sft, *a.policies]:
        t0 = time.time()
        source = models.resolve(spec)
        model = models.inference_model(source, ModelConfig(), "cpu")
        tok = models.load_tokenizer(source)
        queries = [data.encode_prompt(tok, p.messages) for p in prompts]
        scores, kls = [], []
        for b in range(0, len(queries), 8):
            torch.manual_seed(a.seed + b)
            outs = [o[0] for o in models.generate(model, tok, queries[b:b + 8], 1, a.temperature, 1.0,
                                                  a.max_new_tokens, "cpu")]
            for p, q, r in zip(prompts[b:b + 8], queries[b:b + 8], outs):
                text = tok.decode(r, skip_special_tokens=True).strip()
                scores += models.reward_scores(rm, rm_tok, p.messages, [text])
                if spec != a.sft and r:
                    ids = torch.tensor([q + r])
                    with torch.no_grad():
                        lp = rlhf.logprobs_from_logits(model(input_ids=ids).logits[:, len(q) - 1:-1], ids[:, len(q):])
                        with model.disable_adapter():  # the SFT model: the merged base
                            ref = rlhf.logprobs_from_logits(model(input_ids=ids).logits[:, len(q) - 1:-1],
                                                            ids[:, len(q):])
                    kls.append((lp - ref).sum().item())
        total, n = 0.0, 0
        with torch.no_grad():
            for r in texts:
                ids = torch.tensor([data.encode_text(tok, r.text)[:256]])
                s, c = rlhf.lm_loss_sum(model(input_ids=ids).logits, ids)
                total, n = total + s.item(), n + c
        print(json.dumps({"model": spec, "prompts": len(prompts), "score_mean": statistics.mean(scores),
                          "score_sem": statistics.stdev(scores) / len(scores) ** 0.5,
                          "kl_to_sft": statistics.mean(kls) if kls else 0.0, "lm_loss": total / n,
                          "seconds": round(time.time() - t0, 1)}), flush=True)


if __name__ == "__main__":
    main()
