"""The TRL side of bench/vs_trl.py; runs inside TRL's own virtual environment (never ours).

    python bench/peer_trl.py sft|rm --model DIR --data FILE --steps N --batch B --max-len L --out JSON

Same LoRA shape (r 16, alpha 32, dropout 0.05, all linear layers), optimizer (AdamW), learning rate, steps,
batch and precision (fp32 on a CPU, bf16 on a GPU; no activation checkpointing) as the instruct run it is
compared with. Prints and writes {"seconds", "steps", "tokens" or "pairs"}.
"""

from __future__ import annotations

import argparse
import json
import time


def rows(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(x) for x in f if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", choices=["sft", "rm"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=4, help="rows per step (sft) or pairs per step (rm)")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--grad-accum", type=int, default=1, help="micro-batches per step (batch = micro x accum)")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()

    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(a.model)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                      task_type="CAUSAL_LM" if a.stage == "sft" else "SEQ_CLS")

    class Clock(TrainerCallback):  # time the optimizer steps only, as instruct's metrics do
        def __init__(self):
            self.t0, self.total = None, 0.0

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step > 1:  # the first step warms up, as in instruct's median
                self.total += time.perf_counter() - self.t0

    clock = Clock()
    common = dict(output_dir="/tmp/peer_trl_out", max_steps=a.steps, per_device_train_batch_size=a.batch // a.grad_accum,
                  gradient_accumulation_steps=a.grad_accum,
                  learning_rate=a.lr, logging_steps=1000, save_strategy="no", report_to=[],
                  seed=0, dataloader_num_workers=0, lr_scheduler_type="constant", warmup_steps=0,
                  use_cpu=not torch.cuda.is_available(),
                  # the same arithmetic as instruct on this device: TRL's defaults would add bf16 autocast
                  # (fp32 is what instruct uses on a CPU) and activation checkpointing (instruct has none)
                  bf16=torch.cuda.is_available(), gradient_checkpointing=False)
    if a.stage == "sft":
        from trl import SFTConfig, SFTTrainer

        data = []
        for r in rows(a.data):
            msgs = r.get("messages") or [{"role": "user", "content": r["prompt"]},
                                         {"role": "assistant", "content": r["response"]}]
            data.append({"prompt": msgs[:-1], "completion": msgs[-1:]})
        ds = Dataset.from_list(data)
        trainer = SFTTrainer(model=a.model, train_dataset=ds, processing_class=tok, peft_config=lora,
                             callbacks=[clock], args=SFTConfig(max_length=a.max_len, **common))
        tokens = []  # response tokens that carry loss, counted as instruct counts them (the first cannot)
        for ex in trainer.train_dataset:
            if ex.get("labels") is not None:  # TRL 1.x: -100 outside the completion
                tokens.append(sum(x != -100 for x in ex["labels"][1:]))
            elif ex.get("completion_mask") or ex.get("assistant_masks"):
                mask = ex.get("completion_mask") or ex.get("assistant_masks")
                tokens.append(sum(mask[1:]))
            else:
                raise SystemExit("peer_trl: cannot tell response tokens from prompt tokens in TRL's dataset")
        trainer.train()
        per_step = sum(tokens) / len(tokens) * a.batch  # mean completion tokens per step (order is shuffled)
        result = {"seconds": clock.total, "steps": a.steps - 1, "tokens": per_step * (a.steps - 1)}
    else:
        from trl import RewardConfig, RewardTrainer

        pairs = []
        for r in rows(a.data):  # a K-way ranking becomes its C(K,2) pairs, as TRL needs
            k = len(r["responses"])
            for i in range(k):
                for j in range(k):
                    if r["ranks"][i] < r["ranks"][j]:
                        pairs.append({"chosen": [{"role": "user", "content": r["prompt"]},
                                                 {"role": "assistant", "content": r["responses"][i]}],
                                      "rejected": [{"role": "user", "content": r["prompt"]},
                                                   {"role": "assistant", "content": r["responses"][j]}]})
        ds = Dataset.from_list(pairs)
        trainer = RewardTrainer(model=a.model, train_dataset=ds, processing_class=tok, peft_config=lora,
                                callbacks=[clock], args=RewardConfig(max_length=a.max_len, **common))
        trainer.train()
        result = {"seconds": clock.total, "steps": a.steps - 1, "pairs": a.batch * (a.steps - 1)}
    import resource

    result["peak_mem_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if torch.cuda.is_available():
        result["peak_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(json.dumps(result))
    with open(a.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
