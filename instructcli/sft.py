"""Stage 1, supervised fine-tuning: the loop in plain sight (nanoGPT style), loss on response tokens only."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from instructcli import batches, checkpoint, console, data, forward, loop, models, parallel, sources, tokens
from instructcli.config import SFTConfig, to_dict
from instructcli.errors import InstructError



def train(cfg: SFTConfig) -> Path:
    t, mc = cfg.train, cfg.model
    console.set_quiet(cfg.quiet)
    run = checkpoint.RunDir(cfg.out, cfg.overwrite, cfg.resume)  # checks only; writes nothing yet

    # 1. data: validate every row before anything is loaded or written
    rows = data.load(cfg.data, "demonstrations", cfg.skip_invalid, console.warn, cfg.columns, cfg.split)
    source = sources.resolve(mc.model, console.log)
    tok = models.load_tokenizer(source, mc.trust_remote_code)
    stats, examples = tokens.OverflowStats(), []
    for i, rec in enumerate(rows.records):
        ids, labels = tokens.encode_demonstration(tok, rec.messages)
        fitted = tokens.fit_length(ids, labels, cfg.max_len, cfg.overflow, stats, f"{rows.path}: row {i + 1}")
        if fitted:
            examples.append(fitted)
    console.log(f"data: {rows.rows} rows ({rows.skipped} invalid skipped); {stats.summary()}")
    if not examples:
        raise InstructError(f"{rows.path}: every example was dropped by --max-len {cfg.max_len}", 2)

    # held-out split, fixed by the seed
    train_idx, eval_idx = data.split(len(examples), t.eval_frac, t.seed)
    train_set, eval_set = [examples[i] for i in train_idx], [examples[i] for i in eval_idx]

    # 2. model and optimiser
    checkpoint.seed_everything(t.seed)
    device = models.pick_device()
    model = models.trainable_model(source.as_base(), mc, device)  # a run dir given as --model is merged in
    model.config.use_cache = False
    params = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in params)
    optimizer = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    per_step, total, scheduler = loop.schedule(t, optimizer, len(train_set))
    console.log(f"sft: {len(train_set)} train / {len(eval_set)} eval examples, {total} steps of "
                f"{t.batch_size}x{t.grad_accum}{parallel.times()}, {n_trainable:,} trainable parameters, {mc.quant} "
                f"base on {device}")

    ident = checkpoint.identity(cfg, {"data": (cfg.data, rows.sha256)}, source)
    start, state, metrics = loop.start_or_resume(run, model, optimizer, scheduler, params, cfg.resume, t.seed, per_step,
                                                 ident, config=cfg)

    order = checkpoint.EpochOrder(len(train_set), t.seed)  # the data position is a function of the step: resumable

    def evaluate() -> float:
        model.eval()
        loss_sum, n = 0.0, 0
        with torch.no_grad():
            mine = parallel.strided(eval_set)
            for b in range(0, len(mine), t.batch_size):
                batch = {k: v.to(device) for k, v in batches.collate(mine[b:b + t.batch_size],
                                                                  tok.pad_token_id).items()}
                s, c = forward.lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
                loss_sum, n = loss_sum + s.item(), n + c
        model.train()
        loss_sum, n = parallel.sum_all(loss_sum, n)
        return loss_sum / max(n, 1)

    # 3. the loop
    model.train()
    guard, micro, last = *loop.step_controls(run, t, state), {}
    t0 = time.time()
    with loop.Interrupt() as interrupt, console.Bar(total, "sft", completed=start) as bar:
        for step in range(start, total):
            examples = [train_set[order[step * per_step + i]] for i in range(per_step)]
            n_tokens = sum(sum(x != tokens.IGNORE_INDEX for x in ex[1][1:]) for ex in examples)

            def micro_step(mb, _share):  # the loss is per token of the whole step, however it is split
                batch = {k: v.to(device) for k, v in batches.collate(mb, tok.pad_token_id).items()}
                loss = forward.lm_loss_sum(model, batch["input_ids"], batch["attention_mask"], batch["labels"])[0] \
                    / max(n_tokens, 1)
                loss.backward()
                return loss.item()

            # this process's share of the step; gradients and loss are then summed over processes
            step_loss = parallel.sum_all(sum(micro.run(step + 1, parallel.shard(examples), micro_step, optimizer)))[0]
            parallel.sync_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm).item()
            if (lr := loop.optimizer_step(guard, step + 1, step_loss, grad_norm, optimizer, scheduler)) is None:
                continue

            done = step + 1
            last = {"step": done, "epoch": round(done * per_step / len(train_set), 4), "loss": step_loss,
                    "lr": lr, "grad_norm": grad_norm, "tokens": n_tokens,
                    "tokens_per_s": n_tokens / max(time.time() - t0, 1e-9)}
            t0 = time.time()
            if t.eval_every and eval_set and (done % t.eval_every == 0 or done == total):
                last["eval_loss"] = evaluate()
            if done % t.log_every == 0 or done == total or "eval_loss" in last:
                last["peak_mem_mb"] = round(console.peak_memory_mb(), 1)
                metrics.write(last)
            bar.update(1, f"loss {step_loss:.3f}" + (f" eval {last['eval_loss']:.3f}" if "eval_loss" in last else ""))
            loop.checkpoint_or_stop(run, done, total, interrupt, t.save_every, t.keep_checkpoints, model, optimizer,
                                    scheduler, {"tokens": n_tokens, "micro_batch": micro.size,
                                                "examples_per_step": per_step}, metrics)
    metrics.close()

    # 4. save: adapter (or full weights) + tokenizer + manifest, renamed into place
    final = {k: last[k] for k in ("step", "loss", "eval_loss") if k in last}
    if "eval_loss" not in final and eval_set:
        final["eval_loss"] = evaluate()
    out = run.finish(model, tok, {
        "stage": "sft",
        "full": mc.full,
        **sources.lineage(source),
        "data": {**rows.describe(), "overflow": vars(stats)},
        "config": to_dict(cfg),
        "metrics": final,
    })
    console.log(f"sft: done, {final}; saved to {out}")
    return out
