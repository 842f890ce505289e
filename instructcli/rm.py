"""Stage 2, the reward model: K ranked responses of one prompt forwarded once, as one batch element, and the
paper's loss over all C(K,2) pairs; then a bias so reference demonstrations score 0 on average."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from instructcli import batches, checkpoint, console, data, files, loop, models, parallel, rlhf, sources, tokens
from instructcli.config import ModelConfig, RMConfig, to_dict
from instructcli.errors import InstructError
from instructcli.stats import ratio_ci


def forward_groups(model, groups: list[list[list[int]]], starts: list[int], pad_id: int,
                   device: str) -> list[torch.Tensor]:
    """Score every response of every group (its responses begin at starts[g]) in one right-padded forward;
    returns one (K,) tensor per group."""
    flat = [ids for g in groups for ids in g]
    batch = batches.collate_sequences(flat, pad_id)
    first = torch.tensor([s for g, s in zip(groups, starts) for _ in g], device=device)
    scores = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), first)
    return list(scores.split([len(g) for g in groups]))


def padded(groups: list[torch.Tensor], ranks: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    k = max(len(r) for r in ranks)
    rewards = torch.stack([torch.nn.functional.pad(g, (0, k - len(g))) for g in groups])
    rk = torch.tensor([r + [0] * (k - len(r)) for r in ranks], device=rewards.device)
    return rewards, rk


def train(cfg: RMConfig) -> Path:
    t, mc = cfg.train, cfg.model
    console.set_quiet(cfg.quiet)
    run = checkpoint.RunDir(cfg.out, cfg.overwrite, cfg.resume)

    # 1. data
    rows = data.load(cfg.data, "comparisons", cfg.skip_invalid, console.warn, cfg.columns, cfg.split)
    norm_rows = data.load(cfg.norm_data, "demonstrations", cfg.skip_invalid, console.warn, split=cfg.split) if cfg.norm_data else None
    source = sources.resolve(mc.model, console.log)
    tok = models.load_tokenizer(source, mc.trust_remote_code)
    stats, examples = tokens.OverflowStats(), []
    for i, rec in enumerate(rows.records):
        enc = tokens.encode_responses(tok, rec.messages, rec.responses, cfg.max_len, cfg.overflow, stats,
                                    f"{rows.path}: row {i + 1}", rec.ended)
        if enc is not None:  # (responses' ids, ranks, where the responses begin)
            examples.append((enc, rec.ranks, len(tokens.encode_prompt(tok, rec.messages))))
    if not examples:
        raise InstructError(f"{rows.path}: every comparison was dropped by --max-len {cfg.max_len}", 2)
    train_idx, eval_idx = data.split(len(examples), t.eval_frac, t.seed)
    train_set, eval_set = [examples[i] for i in train_idx], [examples[i] for i in eval_idx]
    if norm_rows:  # (ids, where the response begins)
        reference = [(tokens.encode_responses(tok, r.messages[:-1], [r.messages[-1]["content"]], cfg.max_len,
                                            "truncate", tokens.OverflowStats(), "")[0],
                      len(tokens.encode_prompt(tok, r.messages[:-1]))) for r in norm_rows.records]
    else:  # the best-ranked response of every training comparison
        reference = [(enc[ranks.index(min(ranks))], start) for enc, ranks, start in train_set]
    n_pairs = sum(sum(a < b for a in r for b in r) for _, r, _ in train_set)
    console.log(f"data: {rows.rows} comparisons ({rows.skipped} invalid skipped), K = "
                f"{min(len(e[1]) for e in examples)}..{max(len(e[1]) for e in examples)}, {n_pairs} ranked pairs "
                f"in training; {stats.summary()}")

    # 2. model: base (with --from merged in) + LoRA + scalar head
    checkpoint.seed_everything(t.seed)
    device = models.pick_device()
    model = models.new_reward_model(source.as_base(), mc, device, cfg.pool, cfg.score_depth)
    params = [p for p in model.parameters() if p.requires_grad]
    head = [p for p in model.head.parameters() if p.requires_grad]
    # the head starts random and must move far in few steps, the adapter only a little: its own learning rate
    optimizer = torch.optim.AdamW([{"params": [p for p in params if all(p is not q for q in head)]},
                                   {"params": head, "lr": cfg.head_lr or t.lr}], lr=t.lr,
                                  weight_decay=t.weight_decay)
    per_step, total, scheduler = loop.schedule(t, optimizer, len(train_set))
    console.log(f"rm: {len(train_set)} train / {len(eval_set)} eval prompts, {total} steps of "
                f"{t.batch_size}x{t.grad_accum}{parallel.times()} prompts, {sum(p.numel() for p in params):,} "
                f"trainable parameters, {mc.quant} base on {device}")
    inputs = {"data": (cfg.data, rows.sha256)}
    if norm_rows:
        inputs["norm_data"] = (cfg.norm_data, norm_rows.sha256)
    start, state, metrics = loop.start_or_resume(run, model, optimizer, scheduler, params, cfg.resume, t.seed, per_step,
                                                 checkpoint.identity(cfg, inputs, source), config=cfg)
    order = checkpoint.EpochOrder(len(train_set), t.seed)

    def evaluate() -> dict:
        """Loss and pairwise accuracy on the held-out prompts, the accuracy with a bootstrap 95 % CI over them
        (a prompt's pairs are drawn together): ten prompts give an interval too wide to steer by."""
        model.eval()
        losses, per_prompt = [], []  # per_prompt: (pairs ordered right, pairs) of each held-out prompt
        with torch.no_grad():
            mine = parallel.strided(eval_set)
            for b in range(0, len(mine), t.batch_size):
                chunk = mine[b:b + t.batch_size]
                rewards, ranks = padded(forward_groups(model, [e[0] for e in chunk], [e[2] for e in chunk],
                                                       tok.pad_token_id, device), [e[1] for e in chunk])
                loss, _, _ = rlhf.ranking_loss(rewards, ranks)
                losses.append(loss.item() * len(chunk))
                per_prompt += zip(*(x.tolist() for x in rlhf.pair_hits(rewards, ranks)))
        model.train()
        (loss_sum,) = parallel.sum_all(sum(losses))
        hits, pairs = zip(*parallel.gather(per_prompt))
        lo, hi = ratio_ci(hits, pairs, seed=t.seed)
        return {"eval_loss": loss_sum / len(eval_set), "eval_accuracy": sum(hits) / max(sum(pairs), 1),
                "eval_accuracy_ci95_lo": lo, "eval_accuracy_ci95_hi": hi}  # two numbers: trackers plot them

    # 3. the loop
    model.train()
    guard, micro, last = *loop.step_controls(run, t, state), {}
    t0 = time.time()
    with loop.Interrupt() as interrupt, console.Bar(total, "rm", completed=start) as bar:
        for step in range(start, total):
            def micro_step(chunk, share):  # the step's loss is the mean over its prompts (of all processes)
                share /= parallel.world
                groups = forward_groups(model, [e[0] for e in chunk], [e[2] for e in chunk], tok.pad_token_id, device)
                rewards, ranks = padded(groups, [e[1] for e in chunk])
                loss, acc, n = rlhf.ranking_loss(rewards, ranks)
                (loss * share).backward()
                return loss.item() * share, acc.item() * n.item(), n.item()

            # this process's share of the step; gradients, loss and accuracy are then summed over processes
            examples = [train_set[order[step * per_step + i]] for i in range(per_step)]
            parts = micro.run(step + 1, parallel.shard(examples), micro_step, optimizer)
            # accuracy over the step's pairs, whichever process or micro-batch they fell in
            step_loss, correct, pairs = parallel.sum_all(*(sum(p[i] for p in parts) for i in range(3)))
            step_acc = correct / max(pairs, 1)
            parallel.sync_grads(params)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm).item()
            if (lr := loop.optimizer_step(guard, step + 1, step_loss, grad_norm, optimizer, scheduler)) is None:
                continue

            done = step + 1
            n_seq = sum(len(e[0]) for e in examples)
            last = {"step": done, "epoch": round(done * per_step / len(train_set), 4), "loss": step_loss,
                    "accuracy": step_acc, "lr": lr, "grad_norm": grad_norm,
                    "responses_per_s": n_seq / max(time.time() - t0, 1e-9)}
            t0 = time.time()
            if t.eval_every and eval_set and (done % t.eval_every == 0 or done == total):
                last.update(evaluate())
            if done % t.log_every == 0 or done == total or "eval_loss" in last:
                last["peak_mem_mb"] = round(console.peak_memory_mb(), 1)
                metrics.write(last)
            bar.update(1, f"loss {step_loss:.3f} acc {step_acc:.2f}" +
                       (f" eval acc {last['eval_accuracy']:.2f}" if "eval_accuracy" in last else ""))
            loop.checkpoint_or_stop(run, done, total, interrupt, t.save_every, t.keep_checkpoints, model, optimizer,
                                    scheduler, {"micro_batch": micro.size, "examples_per_step": per_step}, metrics)
    metrics.close()

    # 4. normalise (stored, applied whenever the RM scores): reference demonstrations score 0 on average, and
    # the training responses (the policy's own samples, when the rankings are on-policy) spread with std 1, as
    # lm-human-preferences normalises; so --kl means the same against any reward model
    model.eval()

    def raw_scores(items: list[tuple[list[int], int]]) -> torch.Tensor:
        mine, out = parallel.strided(items), []
        with torch.no_grad():
            for b in range(0, len(mine), 16):
                chunk = mine[b:b + 16]
                out += [g.item() for g in forward_groups(model, [[ids] for ids, _ in chunk], [s for _, s in chunk],
                                                         tok.pad_token_id, device)]
        return torch.tensor(parallel.gather(out))

    ref_scores = raw_scores(reference)
    spread = raw_scores([(ids, start) for enc, _, start in train_set for ids in enc])
    model.bias = ref_scores.mean().item()
    model.scale = 1.0 / spread.std().item() if len(spread) > 1 and spread.std().item() > 1e-6 else 1.0
    final = {k: last[k] for k in ("step", "loss", "accuracy", "eval_loss", "eval_accuracy", "eval_accuracy_ci95_lo",
                                  "eval_accuracy_ci95_hi") if k in last}
    if eval_set and "eval_accuracy" not in final:
        final.update(evaluate())
    if eval_set and not final["eval_accuracy_ci95_lo"] > 0.5:
        lo, hi = final["eval_accuracy_ci95_lo"], final["eval_accuracy_ci95_hi"]
        console.warn(f"rm: held-out accuracy {final['eval_accuracy']:.2f} [{lo:.2f}, {hi:.2f}] on {len(eval_set)} "
                     f"prompts does not show the RM above chance (0.5): before PPO, check it on more held-out "
                     f"prompts (--eval-frac, or instruct score on fresh samples) or give it more rankings")
    out = run.finish(model, tok, {
        "stage": "rm",
        **sources.lineage(source),
        "data": {**rows.describe(), "overflow": vars(stats)},
        "reward_head": {"pool": model.pool, "layers": model.layers},  # how the head reads (sources.reward_reading)
        "reward_norm": {"bias": model.bias, "scale": model.scale, "n": len(reference),
                        "data": norm_rows.describe() if norm_rows else "best-ranked training responses",
                        "raw_std": ref_scores.std().item() if len(ref_scores) > 1 else 0.0,
                        "scale_from": f"std of the {len(spread)} training responses' raw scores"},
        "config": to_dict(cfg),
        "metrics": final,
    })
    console.log(f"rm: done, {final}, reward bias {model.bias:.4f}, scale {model.scale:.4f}; saved to {out}")
    return out


def score(cfg) -> int:
    """`instruct score`: add normalised `scores` (one per response) to samples rows."""
    console.set_quiet(cfg.quiet)
    samples = data.load(cfg.samples, "samples", cfg.skip_invalid, console.warn)
    device = models.pick_device()
    model, tok, _ = models.load_reward_model(cfg.reward, ModelConfig(quant=cfg.quant, dtype=cfg.dtype), device,
                                             console.log)
    with files.JsonlWriter(cfg.out) as out, console.Bar(len(samples.records), "score") as bar:
        for s in samples.records:
            scores = models.reward_scores(model, tok, s.messages or [{"role": "user", "content": s.prompt}],
                                          s.responses, cfg.max_len, cfg.batch_size, s.extra.get("ended"))
            row = {"id": s.id, "prompt": s.prompt, "responses": s.responses, "model": s.model, **s.extra,
                   "scores": scores}
            if s.messages:
                row["messages"] = s.messages
            out.write(row)
            bar.update(1)
    return len(samples.records)
