"""Batched generation: K samples per prompt, written as `samples` rows ready for `label`, `score` and `compare`."""

from __future__ import annotations

from instructcli import console, data, files, generate, models, sources, tokens
from instructcli.config import SampleConfig


def run(cfg: SampleConfig) -> int:
    mc = cfg.model
    console.set_quiet(cfg.quiet)
    prompts = data.load(cfg.prompts, "prompts", cfg.skip_invalid, console.warn, cfg.columns, cfg.split)
    source = sources.resolve(mc.model, console.log)
    tok = models.load_tokenizer(source, mc.trust_remote_code)
    rows = prompts.records
    encoded, cut = tokens.encode_prompts(tok, prompts, cfg.max_prompt_len)
    if cut:
        console.warn(f"{cut} prompts longer than --max-prompt-len {cfg.max_prompt_len} kept their end")
    device = models.pick_device()
    model = models.inference_model(source, mc, device)
    console.log(f"sample: {len(rows)} prompts x {cfg.n} from {mc.model} on {device}")
    with files.JsonlWriter(cfg.out) as out, console.Bar(len(rows), "sample") as bar:
        for b, outs in generate.sample_batches(model, tok, encoded, cfg.n, cfg.temperature, cfg.top_p,
                                             cfg.max_new_tokens, cfg.batch_size, cfg.seed, device, cfg.decode):
            for p, seqs in zip(rows[b:b + cfg.batch_size], outs):
                row = {"id": p.id, "prompt": p.prompt,
                       "responses": [tok.decode(s, skip_special_tokens=True).strip() for s in seqs],
                       "ended": [tokens.ended(tok, s) for s in seqs],  # False: cut off at --max-new-tokens
                       "model": mc.model}
                if len(p.messages) > 1:
                    row["messages"] = p.messages
                out.write(row)
            bar.update(len(outs))
    return len(rows)
