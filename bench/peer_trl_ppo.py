"""The TRL side of `bench/vs_trl.py --only ppo`; runs inside bench/.venv-trl-ppo (TRL 1.12.0, the last release
with a PPOTrainer, in trl.experimental.ppo), never in ours.

    python bench/peer_trl_ppo.py --model DIR --prompts FILE --steps N [--batch 8] [--mini-batch 4] [--quant 4bit]
        [--max-new-tokens 32] --out JSON

Set up like the instruct run it is compared with: the same model, prompts (chat template with the generation
prompt), rollout batch, mini-batch, response length, temperature 0.7 (no top-k, top-p 1), stop at EOS, 1 PPO
epoch, AdamW at a constant learning rate, beta 0.02 (k1 estimator), clip 0.2 / value clip 0.2, vf_coef 0.1,
gamma 1, lambda 0.95, seed 0, fp32, no activation checkpointing. The policy gets LoRA r 16 / alpha 32 /
dropout 0.05 on all linear layers through TRL's peft_config (the reference is that policy with its adapter
off, as in instruct). TRL's value model is a whole AutoModelForSequenceClassification that it trains in full;
by default it gets the same LoRA shape here (the score head stays trainable), as instruct's value is a LoRA
adapter plus a head; --full-value keeps TRL's own way. The reward model is a separate frozen
AutoModelForSequenceClassification (num_labels 1, a random head: a throughput test).

Each PPO step is timed on the wall clock between the trainer's step-end callbacks (the first from train begin
is the warm-up and is left out); the policy's generate() is wrapped to time generation and count the
generated tokens (up to and including the first EOS, as instruct counts them). Writes --out as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import tempfile
import time

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")

LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True, help="a plain (safetensors) model dir")
    ap.add_argument("--prompts", required=True, help="JSONL with a 'prompt' field")
    ap.add_argument("--steps", type=int, default=5, help="PPO steps (the first is warm-up and not counted)")
    ap.add_argument("--batch", type=int, default=8, help="prompts per rollout")
    ap.add_argument("--mini-batch", type=int, default=4, help="rollouts per optimizer step")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--kl", type=float, default=0.02)
    ap.add_argument("--max-prompt-len", type=int, default=256, help="longer prompts keep their end")
    ap.add_argument("--quant", default="none", choices=["none", "8bit", "4bit"],
                    help="bitsandbytes base for all three models (4bit: NF4, bf16 compute, double quant, as instruct)")
    ap.add_argument("--full-value", action="store_true", help="train the whole value model (TRL's own way) "
                    "instead of a LoRA adapter + head")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if a.batch % a.mini_batch:
        ap.error("--batch must be a multiple of --mini-batch")

    import torch
    import transformers
    import trl
    from datasets import Dataset
    from peft import LoraConfig, inject_adapter_in_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    torch.manual_seed(0)
    gpu = torch.cuda.is_available()
    unmatched = []

    tok = AutoTokenizer.from_pretrained(a.model)
    tok.padding_side = "left"  # TRL's rollout expects left-padded queries
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # TRL finds padding by comparing against the pad id; with pad == EOS (this model: <|im_end|>) it would
        # mask every turn end inside the chat-templated prompts. An existing token that never occurs in them
        # serves instead (TRL zeroes pad ids before the embedding, so no resize is needed).
        tok.pad_token = tok.convert_ids_to_tokens(0) if tok.eos_token_id != 0 else tok.unk_token
    queries = []
    with open(a.prompts, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                msgs = [{"role": "user", "content": json.loads(line)["prompt"]}]
                ids = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
                ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                queries.append({"input_ids": list(ids)[-a.max_prompt_len:]})
    if any(tok.pad_token_id in q["input_ids"] for q in queries):
        raise SystemExit(f"pad token {tok.pad_token!r} occurs in the prompts")
    train = Dataset.from_list(queries)

    dtype = torch.float32 if not gpu else torch.bfloat16
    load = {"dtype": dtype}
    if a.quant != "none":
        from transformers import BitsAndBytesConfig

        load["quantization_config"] = (BitsAndBytesConfig(load_in_8bit=True) if a.quant == "8bit" else
                                       BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                          bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=True))
        unmatched.append(f"{a.quant} base loaded three times (policy, reward, value); instruct holds one")
    policy = AutoModelForCausalLM.from_pretrained(a.model, **load)
    reward = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1, **load)
    for m in (reward, value):
        m.config.pad_token_id = tok.pad_token_id
    for p in reward.parameters():
        p.requires_grad_(False)
    lora = dict(r=16, lora_alpha=32, lora_dropout=0.05)
    if not a.full_value:
        inject_adapter_in_model(LoraConfig(target_modules=LINEAR, **lora), value)
        for n, p in value.named_parameters():
            p.requires_grad_("lora_" in n or n.startswith("score."))
    else:
        unmatched.append("value model trained in full (--full-value), instruct trains a LoRA value adapter + head")

    cfg = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="peer_trl_ppo_"), report_to=[], save_strategy="no", logging_steps=10**6,
        seed=0, dataloader_num_workers=0, use_cpu=not gpu, bf16=gpu, fp16=False, gradient_checkpointing=False,
        per_device_train_batch_size=a.batch, gradient_accumulation_steps=1,  # rollout batch = this x accumulation
        num_mini_batches=a.batch // a.mini_batch, num_ppo_epochs=1, total_episodes=a.steps * a.batch,
        local_rollout_forward_batch_size=a.batch,  # one generate() call per rollout, as instruct
        response_length=a.max_new_tokens, temperature=a.temperature, stop_token="eos", missing_eos_penalty=None,
        learning_rate=a.lr, weight_decay=0.01,  # torch AdamW's default, which instruct's optimizer keeps
        lr_scheduler_type="constant", warmup_steps=0, kl_coef=a.kl, kl_estimator="k1",
        cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95, whiten_rewards=False,
        num_sample_generations=0, max_grad_norm=1.0)
    unmatched += [
        "no gradient clipping: TRL's PPO loop calls optimizer.step() without clipping (instruct clips at 1.0)",
        "old log-probs come from generate()'s scores (instruct runs the policy over the rollout once more)",
        "reward model: a separate full model with a random head, scoring the generated ids (instruct: the shared "
        "base + the rm run's adapter and head, on prompt + decoded response re-encoded with the chat template)",
        "value: fresh LoRA + random head on a separate full model (instruct: the rm run's adapter and head as its "
        "start, on the shared base)",
        "weights: the plain model dir for policy, reward and value (instruct: the 1-step sft run merged into it)",
        "pad token: <|endoftext|> (id 0) instead of <|im_end|> (= EOS), which TRL's pad masking cannot take",
        "LoRA dropout set to 0.05 but TRL zeroes every dropout in its models (instruct runs PPO in eval mode)",
        "prompt order: TRL's shuffled DataLoader (seed 0) vs instruct's own epoch order (seed 0): other prompts "
        "per step, so other prompt lengths",
        "step time: wall clock between TRL's step-end callbacks (its logging and gc included) vs instruct's "
        "rollout_s + optimise_s",
    ]

    gen = {"s": 0.0, "tokens": 0}

    class Clock(TrainerCallback):
        def __init__(self):
            self.t, self.steps = None, []

        def on_train_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            self.steps.append({"seconds": now - self.t, "gen_s": gen["s"], "gen_tokens": gen["tokens"]})
            self.t, gen["s"], gen["tokens"] = now, 0.0, 0

    clock = Clock()
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         train_dataset=train, value_model=value, peft_config=LoraConfig(
                             target_modules="all-linear", task_type="CAUSAL_LM", **lora), callbacks=[clock])

    gen_policy = trainer.accelerator.unwrap_model(trainer.model).policy  # what TRL calls generate() on
    inner = gen_policy.generate

    def timed_generate(*args, **kw):
        t0 = time.perf_counter()
        out = inner(*args, **kw)
        gen["s"] += time.perf_counter() - t0
        new = out.sequences[:, kw["input_ids"].shape[1]:]
        hit = new == tok.eos_token_id
        first = torch.where(hit.any(1), hit.int().argmax(1) + 1, torch.full_like(hit[:, 0], new.shape[1],
                                                                                   dtype=torch.long))
        gen["tokens"] += int(first.sum())
        return out

    gen_policy.generate = timed_generate
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    trainer.train()

    timed = clock.steps[1:]  # the first step warms up
    sec = [s["seconds"] for s in timed]
    result = {
        "trl": trl.__version__, "transformers": transformers.__version__, "torch": torch.__version__,
        "steps": a.steps, "steps_timed": len(timed), "batch": a.batch, "quant": a.quant,
        "mini_batch": a.mini_batch,
        "max_new_tokens": a.max_new_tokens, "trainable_params": trainable,
        "median_s_per_step": statistics.median(sec) if sec else None, "step_seconds": sec,
        "gen_seconds": [s["gen_s"] for s in timed], "gen_tokens": [s["gen_tokens"] for s in timed],
        "warmup_step": clock.steps[0] if clock.steps else None,
        "peak_mem_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "unmatched": unmatched,
    }
    if gpu:
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))
    with open(a.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
