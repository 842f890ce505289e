"""The README's main command (scripts/demo.sh) done with TRL: sft -> sample -> rm -> ppo -> sample -> score, on
the same model, data and sizes; runs inside bench/.venv-trl-ppo (TRL 1.12.0, the last release with SFT, reward
and PPO trainers together), never in ours.

    python bench/peer_trl_demo.py --model DIR --out DIR [--sft-steps 30] [--rm-steps 12] [--ppo-steps 4]

What a TRL user would write for the same chain, with demo.sh's sizes and instruct's defaults where TRL's differ:
- sft: SFTTrainer, LoRA r 16 / alpha 32 / dropout 0.05 on all linear layers, 30 steps of 4 rows, lr 2e-4
  cosine with 5 % warmup, max length 512, 5 % held out and evaluated every 10 steps, a checkpoint every 10;
  the adapter is merged for the next stages (instruct merges it into its shared base too).
- sample: 2 answers to each of the last 8 held-out prompts, 48 new tokens, T 0.7 (generate()).
- rm: RewardTrainer from the merged SFT model, each K-way ranking as its C(K,2) pairs (TRL takes pairs), 12 steps
  of 4 rankings' pairs (micro-batches of 12 pairs), lr 1e-4, max length 256, 10 % held out, evaluated every 6.
- ppo: PPOTrainer, 4 steps of 8 rollouts, one mini-batch of 8, 1 epoch, 48 new tokens at T 1, beta 0.02,
  policy = merged SFT + LoRA, reward = the merged RM, value = the merged RM + LoRA (as instruct's value adapter).
  TRL has no PPO-ptx: the pretraining loss (instruct's --ptx-coef 27.8) is not part of TRL's step.
- score: the RM on the SFT and PPO samples.
Prints and writes {"seconds", per-stage seconds, "peak_mem_mb", mean rewards} as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def main() -> None:
    t_start = time.perf_counter()
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a plain (safetensors) model dir")
    ap.add_argument("--out", required=True)
    ap.add_argument("--sft-steps", type=int, default=30)
    ap.add_argument("--rm-steps", type=int, default=12)
    ap.add_argument("--ppo-steps", type=int, default=4)
    ap.add_argument("--ppo-batch", type=int, default=8)
    ap.add_argument("--prompts", type=int, default=8, help="held-out prompts sampled before and after PPO")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=48)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    out, times = a.out, {}
    os.makedirs(out, exist_ok=True)
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    common = dict(report_to=[], seed=0, dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(),
                  bf16=torch.cuda.is_available(), gradient_checkpointing=False, logging_steps=10**6)
    tok = AutoTokenizer.from_pretrained(a.model)

    def chat(prompt, response=None):
        turns = [{"role": "user", "content": prompt}]
        return turns + [{"role": "assistant", "content": response}] if response else turns

    def merged(peft_model, name):  # each stage's adapter merged into a plain model dir, the next stage's input
        peft_model.merge_and_unload().save_pretrained(f"{out}/{name}")
        tok.save_pretrained(f"{out}/{name}")

    # 1. sft
    t = time.perf_counter()
    demos = [r.get("messages") or chat(r["prompt"], r["response"]) for r in rows("data_samples/demonstrations.jsonl")]
    demos = Dataset.from_list([{"prompt": m[:-1], "completion": m[-1:]} for m in demos]).train_test_split(0.05, seed=0)
    sft = SFTTrainer(model=a.model, train_dataset=demos["train"], eval_dataset=demos["test"], processing_class=tok,
                     peft_config=LoraConfig(task_type="CAUSAL_LM", **lora),
                     args=SFTConfig(output_dir=f"{out}/sft_run", max_steps=a.sft_steps,
                                    per_device_train_batch_size=4, learning_rate=2e-4, lr_scheduler_type="cosine",
                                    warmup_steps=max(1, a.sft_steps // 20), max_length=512, eval_strategy="steps",
                                    eval_steps=10, save_steps=10, save_total_limit=2, **common))
    sft.train()
    merged(sft.model, "sft")
    del sft
    times["sft"] = time.perf_counter() - t

    # 2. sample from the sft model
    t = time.perf_counter()
    held = [r.get("messages") or chat(r["prompt"]) for r in rows("data_samples/prompts_heldout.jsonl")][-a.prompts:]

    def sample(model_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
        tok.padding_side = "left"
        enc = tok.apply_chat_template(held, add_generation_prompt=True, padding=True,
                                      return_tensors="pt", return_dict=True)
        with torch.no_grad():
            ids = model.generate(**enc, do_sample=True, temperature=0.7, max_new_tokens=a.new_tokens,
                                 num_return_sequences=a.k, pad_token_id=tok.pad_token_id)
        tok.padding_side = "right"
        texts = tok.batch_decode(ids[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        return [(held[i // a.k], x.strip()) for i, x in enumerate(texts)]

    samples_sft = sample(f"{out}/sft")
    times["sample_sft"] = time.perf_counter() - t

    # 3. rm from the sft model
    t = time.perf_counter()
    pairs = []
    for r in rows("data_samples/comparisons.jsonl"):
        k = len(r["responses"])
        for i in range(k):
            for j in range(k):
                if r["ranks"][i] < r["ranks"][j]:
                    pairs.append({"chosen": chat(r["prompt"], r["responses"][i]),
                                  "rejected": chat(r["prompt"], r["responses"][j])})
    pairs = Dataset.from_list(pairs).train_test_split(0.1, seed=0)
    per_step = 4 * 6  # 4 rankings of K = 4 per instruct step
    rm = RewardTrainer(model=f"{out}/sft", train_dataset=pairs["train"], eval_dataset=pairs["test"],
                       processing_class=tok, peft_config=LoraConfig(task_type="SEQ_CLS", **lora),
                       args=RewardConfig(output_dir=f"{out}/rm_run", max_steps=a.rm_steps,
                                         per_device_train_batch_size=12, gradient_accumulation_steps=per_step // 12,
                                         learning_rate=1e-4, lr_scheduler_type="cosine",
                                         warmup_steps=max(1, a.rm_steps // 20), max_length=256,
                                         eval_strategy="steps", eval_steps=6, save_strategy="no", **common))
    rm.train()
    merged(rm.model, "rm")
    del rm
    times["rm"] = time.perf_counter() - t

    # 4. ppo
    t = time.perf_counter()
    ptok = AutoTokenizer.from_pretrained(f"{out}/sft", padding_side="left")
    ptok.pad_token = ptok.convert_ids_to_tokens(0)  # TRL masks by pad id; pad == EOS would mask turn ends
    queries = Dataset.from_list([
        {"input_ids": ptok.apply_chat_template(chat(r["prompt"]), add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"]}
        for r in rows("data_samples/prompts.jsonl")])
    policy = AutoModelForCausalLM.from_pretrained(f"{out}/sft")
    reward = AutoModelForSequenceClassification.from_pretrained(f"{out}/rm", num_labels=1)
    value = AutoModelForSequenceClassification.from_pretrained(f"{out}/rm", num_labels=1)
    for m in (reward, value):
        m.config.pad_token_id = ptok.pad_token_id
    for p in reward.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(**lora), value)
    for n, p in value.named_parameters():
        p.requires_grad_("lora_" in n or n.startswith("score."))
    cfg = PPOConfig(output_dir=f"{out}/ppo_run", save_strategy="no", per_device_train_batch_size=a.ppo_batch,
                    num_mini_batches=1, num_ppo_epochs=1, total_episodes=a.ppo_steps * a.ppo_batch,
                    local_rollout_forward_batch_size=a.ppo_batch, response_length=a.new_tokens, temperature=1.0,
                    stop_token="eos", learning_rate=1e-4, lr_scheduler_type="constant", kl_coef=0.02,
                    num_sample_generations=0, **common)
    ppo = PPOTrainer(args=cfg, processing_class=ptok, model=policy, ref_model=None, reward_model=reward,
                     train_dataset=queries, value_model=value,
                     peft_config=LoraConfig(task_type="CAUSAL_LM", **lora))
    ppo.train()
    merged(ppo.accelerator.unwrap_model(ppo.model).policy, "ppo")
    del ppo
    times["ppo"] = time.perf_counter() - t

    # 5. sample from the ppo policy, score both sets
    t = time.perf_counter()
    samples_ppo = sample(f"{out}/ppo")
    scorer = AutoModelForSequenceClassification.from_pretrained(f"{out}/rm", num_labels=1).eval()

    def mean_score(samples):
        scores = []
        with torch.no_grad():
            for p, r in samples:
                ids = tok.apply_chat_template(p + [{"role": "assistant", "content": r}], tokenize=True,
                                              return_tensors="pt", return_dict=True)
                scores.append(scorer(**ids).logits[0, 0].item())
        return sum(scores) / len(scores)

    before, after = mean_score(samples_sft), mean_score(samples_ppo)
    times["sample_and_score"] = time.perf_counter() - t
    result = {"seconds": time.perf_counter() - t_start, "stages": times, "mean_reward_sft": before,
              "mean_reward_ppo": after, "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "not_matched": ["no PPO-ptx in TRL (instruct's ppo adds 27.8 x the LM loss on 4 pretraining rows)",
                              "rm: TRL trains on pairs (C(K,2) forwards of both sides per ranking)",
                              "rewards are raw RM scores (instruct normalises them: reference answers score 0)"]}
    print(json.dumps(result))
    with open(f"{out}/result.json", "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
