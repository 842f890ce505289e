"""Batched generation: K samples per prompt, written as `samples` rows ready for `label`, `score` and `compare`."""

from __future__ import annotations

import torch

from instructcli import console, data, models
from instructcli.config import SampleConfig


def run(cfg: SampleConfig) -> int:
    mc = cfg.model
    console.set_quiet(cfg.quiet)
    prompts = data.load(cfg.prompts, "prompts", cfg.skip_invalid, console.warn)
    source = models.resolve(mc.model, console.log)
    tok = models.load_tokenizer(source, mc.trust_remote_code)
    stats, encoded, rows = data.OverflowStats(), [], prompts.records
    for p in prompts.records:
        fitted = data.fit_length(data.encode_prompt(tok, p.messages), None, cfg.max_prompt_len, "truncate", stats,
                                 f"{prompts.path}: id {p.id}", keep="end")
        encoded.append(fitted[0])
    if stats.truncated:
        console.warn(f"{stats.truncated} prompts longer than --max-prompt-len {cfg.max_prompt_len} kept their end")
    device = models.pick_device()
    model = models.inference_model(source, mc, device)
    console.log(f"sample: {len(rows)} prompts x {cfg.n} from {mc.model} on {device}")
    with data.JsonlWriter(cfg.out) as out, console.Bar(len(rows), "sample") as bar:
        for b in range(0, len(rows), cfg.batch_size):
            torch.manual_seed(cfg.seed + b)  # each batch seeded on its own: output independent of earlier batches
            outs = models.generate(model, tok, encoded[b:b + cfg.batch_size], cfg.n, cfg.temperature, cfg.top_p,
                            cfg.max_new_tokens, device)
            for p, seqs in zip(rows[b:b + cfg.batch_size], outs):
                row = {"id": p.id, "prompt": p.prompt,
                       "responses": [tok.decode(s, skip_special_tokens=True).strip() for s in seqs],
                       "model": mc.model}
                if len(p.messages) > 1:
                    row["messages"] = p.messages
                out.write(row)
            bar.update(len(outs))
    return len(rows)
