"""Rollout speed: instruct's sampling loop (generate.generate) against transformers' plain `generate` on the same
LoRA policy, prompts, temperature, top-p and lengths. Prints tokens/s (answer tokens, up to and including
EOS) for each, median and spread over --reps runs with different seeds, and the ratio.

    .venv/bin/python bench/rollout.py [--batch 8] [--max-new-tokens 64] [--n 1] [--reps 5] [--model default]

"instruct" is the eager loop (generate.generate, --decode eager); "instruct static" the static KV cache
(static_decode, --decode static), its step a replayed CUDA graph on CUDA (on CPU the same step, eager).

With --decode-step, instead: ms per decode step (--batch rows after a --prompt-len token prompt, 100). On CPU,
each of the loop's CPU decode changes on top of the previous (none; W @ x.T linears; the lean LoRA chain;
the in-place KV cache), alternating, 3 rounds of 20 steps, median. On CUDA, the eager step against the
captured one, and the step's share of the time it takes to read the weights once at the GPU's bandwidth
(--bandwidth GB/s).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from instructcli import batches, data, decode_cpu, generate, models, sources, static_decode, tokens
from instructcli.config import ModelConfig


def plain_generate(model, tok, prompts, n, temperature, top_p, max_new, device):
    """What a trainer does without our loop: one `generate` call, answers cut after EOS."""
    b = {k: v.to(device) for k, v in batches.collate_prompts(prompts, tok.pad_token_id).items()}
    with torch.no_grad():
        out = model.generate(**b, do_sample=True, temperature=temperature, top_p=top_p, top_k=None,
                             max_new_tokens=max_new, num_return_sequences=n, pad_token_id=tok.pad_token_id,
                             eos_token_id=tok.eos_token_id)
    cut = []
    for seq in out[:, b["input_ids"].shape[1]:].tolist():
        end = next((i + 1 for i, x in enumerate(seq) if x == tok.eos_token_id), len(seq))
        cut.append(seq[:end])
    return [cut[i * n:(i + 1) * n] for i in range(len(prompts))]


def decode_steps(model, rows: int, prompt_len: int) -> None:
    variants = {"none": (contextlib.nullcontext, False),
                "W @ x.T": (lambda: decode_cpu.decode_linears(model, lora=False), False),
                "+ lean LoRA": (lambda: decode_cpu.decode_linears(model), False),
                "+ in-place cache": (lambda: decode_cpu.decode_linears(model), True)}
    ids = torch.randint(100, 1000, (rows, prompt_len))
    kv = generate._cache_name(model)
    res = {k: [] for k in variants}
    for _ in range(3):
        for name, (ctx, prealloc) in variants.items():
            with torch.no_grad(), ctx():
                cache = model(input_ids=ids, use_cache=True)[kv]
                if prealloc:
                    generate._preallocate(cache, 24)
                last, attn, ts = ids[:, -1:], torch.ones(rows, prompt_len + 1, dtype=torch.long), []
                for _ in range(24):
                    t0 = time.perf_counter()
                    model(input_ids=last, attention_mask=attn, use_cache=True, **{kv: cache})
                    ts.append(time.perf_counter() - t0)
                    attn = torch.cat([attn, attn.new_ones(rows, 1)], 1)
                res[name].append(statistics.median(ts[4:]) * 1000)
    print(f"decode step, {rows} rows after a {prompt_len}-token prompt, {torch.get_num_threads()} threads")
    for k, v in res.items():
        print(f"{k:18s} {statistics.median(v):7.1f} ms  (min {min(v):.1f}, max {max(v):.1f})")


def cuda_steps(model, rows: int, prompt_len: int, bandwidth: float, steps: int = 50) -> None:
    """Eager decode step (our loop's, as transformers runs it) against the captured static one, on CUDA."""
    ids = torch.randint(100, 1000, (rows, prompt_len), device="cuda")
    attn = torch.ones_like(ids)
    kv = generate._cache_name(model)
    res = {}
    with torch.no_grad():
        cache = model(input_ids=ids, use_cache=True)[kv]
        last, mask = ids[:, -1:], torch.ones(rows, prompt_len + 1, dtype=torch.long, device="cuda")
        for i in range(steps + 5):
            if i == 5:
                torch.cuda.synchronize()
                t0 = time.perf_counter()
            model(input_ids=last, attention_mask=mask, use_cache=True, **{kv: cache})
            mask = torch.cat([mask, mask.new_ones(rows, 1)], 1)
        torch.cuda.synchronize()
        res["eager"] = (time.perf_counter() - t0) / steps * 1000
        dec = static_decode.decoder_for(model, rows, static_decode.cache_len(prompt_len, steps + 8), 1.0, 1.0,
                                        "cuda", capture=True)
        dec.prefill(ids, attn)
        for _ in range(3):
            dec.step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            dec.step()
        torch.cuda.synchronize()
        res["captured" if dec.graph is not None else "static (not captured)"] = (time.perf_counter() - t0) / steps * 1000
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    floor = weight_bytes / (bandwidth * 1e9) * 1000
    print(f"decode step on {torch.cuda.get_device_name()}, {rows} rows after a {prompt_len}-token prompt; weights "
          f"{weight_bytes / 1e9:.2f} GB, read once at {bandwidth:.0f} GB/s: {floor:.2f} ms")
    for k, v in res.items():
        print(f"{k:24s} {v:7.2f} ms  ({floor / v:.0%} of the bandwidth limit)")
    print(f"peak CUDA memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--n", type=int, default=1, help="samples per prompt (ppo: 1; sample/label: 4..9)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--quant", default="none")
    ap.add_argument("--decode-step", action="store_true", help="time one decode step per CPU change instead")
    ap.add_argument("--prompt-len", type=int, default=100, help="--decode-step: tokens in the cache")
    ap.add_argument("--bandwidth", type=float, default=4800.0, help="--decode-step on CUDA: the GPU's memory "
                    "bandwidth in GB/s (H200: 4800)")
    a = ap.parse_args()
    device = models.pick_device()
    src = sources.resolve(a.model)
    tok = models.load_tokenizer(src)
    model = models.trainable_model(src.as_base(), ModelConfig(quant=a.quant), device)  # the PPO policy: LoRA on
    model.eval()
    if a.decode_step:
        if device == "cuda":
            return cuda_steps(model, a.batch, a.prompt_len, a.bandwidth)
        return decode_steps(model, a.batch, a.prompt_len)
    rows = data.load("data_samples/prompts.jsonl", "prompts", False, print)
    queries, _ = tokens.encode_prompts(tok, rows, 256)
    prompts = queries[:a.batch]
    def static(*args):
        return generate.generate(*args, decode="static")

    runs = (("plain generate", plain_generate), ("instruct", generate.generate), ("instruct static", static))
    results = {name: [] for name, _ in runs}
    for rep in range(a.reps + 1):  # the first round warms up all (and captures the static step)
        for name, fn in runs:
            torch.manual_seed(rep)
            t0 = time.perf_counter()
            out = fn(model, tok, prompts, a.n, a.temperature, a.top_p, a.max_new_tokens, device)
            dt = time.perf_counter() - t0
            if rep:
                results[name].append(sum(len(x) for g in out for x in g) / dt)
    print(f"device {device}, {torch.get_num_threads()} threads; {a.batch} prompts x {a.n} samples, "
          f"{a.max_new_tokens} new tokens, T {a.temperature}, top-p {a.top_p}, {a.reps} runs")
    for name, v in results.items():
        print(f"{name:15s} {statistics.median(v):8.1f} tokens/s  (min {min(v):.1f}, max {max(v):.1f})")
    for name in ("instruct", "instruct static"):
        print(f"{name} / plain generate: {statistics.median(results[name]) / statistics.median(results['plain generate']):.2f}x")


if __name__ == "__main__":
    main()
