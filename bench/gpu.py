"""GPU figures: PPO on a 7B-shaped Llama over an 8-bit or 4-bit base, and SFT throughput/MFU at 1B shape.

    python bench/gpu.py build --shape 7b --tokenizer DIR --out /tmp/llama7b     # random weights, no download
    python bench/gpu.py mfu --shape 1b --tokenizer DIR                            # bf16 SFT step, full fine-tune

Then PPO runs through the real CLI on the built dir (a plain model dir is a valid --policy: the reference is
the base itself), e.g.
    instruct ppo --policy /tmp/llama7b --reward bench/rules.py:length --prompts data_samples/prompts.jsonl \
        --quant 8bit --steps 3 --rollout-batch-size 16 --mini-batch-size 4 --ppo-epochs 1 \
        --max-new-tokens 256 --ptx-coef 0 --save-every 0 -o /tmp/ppo7b
and the step time, rollout share and CUDA peak memory are read from its metrics.jsonl (`summary` below).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

SHAPES = {  # Llama-2 shapes; the vocabulary is the tokenizer's
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4),  # TinyLlama-1.1B
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),  # a dry run of bench/gpu_suite.sh on a CPU
}
PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "4090": 165e12}  # dense TFLOP/s


def config(shape: str, tokenizer: str):
    from transformers import AutoTokenizer, LlamaConfig

    tok = AutoTokenizer.from_pretrained(tokenizer)
    return LlamaConfig(vocab_size=len(tok), max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **SHAPES[shape]), tok


def build(a) -> None:
    from transformers import AutoModelForCausalLM

    out = Path(a.out)
    if (out / "config.json").exists():
        print(f"{out}: already built")
        return
    cfg, tok = config(a.shape, a.tokenizer)
    t0 = time.time()
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    n = sum(p.numel() for p in model.parameters())
    print(json.dumps({"built": str(out), "params": n, "seconds": round(time.time() - t0, 1)}))


def mfu(a) -> None:
    """Full bf16 fine-tuning steps of a random model through forward.lm_loss_sum: tokens/s and MFU
    (6 x parameters x tokens / time / the GPU's dense bf16 peak)."""
    from transformers import AutoModelForCausalLM

    from instructcli import forward

    cfg, _ = config(a.shape, a.tokenizer)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable() if a.checkpointing else None
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    n = sum(p.numel() for p in model.parameters())
    ids = torch.randint(100, cfg.vocab_size, (a.batch, a.seq), device="cuda")
    labels = ids.clone()
    labels[:, : a.seq // 4] = -100  # a prompt quarter, as in SFT
    attn = torch.ones_like(ids)
    times = []
    for i in range(a.steps + 2):
        torch.cuda.synchronize()
        t0 = time.time()
        loss, k = forward.lm_loss_sum(model, ids, attn, labels)
        (loss / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.time() - t0)
    name = torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    step = statistics.median(times)
    tps = a.batch * a.seq / step
    print(json.dumps({"device": name, "shape": a.shape, "params": n, "batch": a.batch, "seq": a.seq,
                      "step_s_median": round(step, 4), "step_s_spread": [round(min(times), 4), round(max(times), 4)],
                      "tokens_per_s": round(tps), "mfu": round(6 * n * tps / peak, 3) if peak else None,
                      "peak_mem_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}))


def summary(a) -> None:
    """Median step time, rollout share, tokens/s and peak memory from a ppo run's metrics.jsonl."""
    rows = [json.loads(x) for x in Path(a.metrics).read_text().splitlines()][a.skip:]
    step = [r["rollout_s"] + r["optimise_s"] for r in rows]
    print(json.dumps({"steps": len(rows), "step_s_median": round(statistics.median(step), 2),
                      "step_s_spread": [round(min(step), 2), round(max(step), 2)],
                      "rollout_share": round(statistics.median(r["rollout_s"] / s for r, s in zip(rows, step)), 3),
                      "rollout_tokens_per_s": round(statistics.median(r["tokens_per_s"] for r in rows), 1),
                      "response_len": statistics.mean(r["response_len"] for r in rows),
                      "peak_mem_gb": round(max(r["peak_mem_mb"] for r in rows) / 1024, 2)}))


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build")
    b.add_argument("--shape", default="7b", choices=SHAPES)
    b.add_argument("--tokenizer", required=True)
    b.add_argument("--out", required=True)
    m = sub.add_parser("mfu")
    m.add_argument("--shape", default="1b", choices=SHAPES)
    m.add_argument("--tokenizer", required=True)
    m.add_argument("--batch", type=int, default=8)
    m.add_argument("--seq", type=int, default=1024)
    m.add_argument("--steps", type=int, default=8)
    m.add_argument("--checkpointing", action="store_true")
    s = sub.add_parser("summary")
    s.add_argument("metrics")
    s.add_argument("--skip", type=int, default=1, help="warm-up steps left out")
    a = ap.parse_args()
    {"build": build, "mfu": mfu, "summary": summary}[a.cmd](a)


if __name__ == "__main__":
    main()
