"""Stage 3, PPO with a per-token KL penalty and PPO-ptx (cleanrl style: numbered phases, one line per loss term).

Policy, reference, reward and value share one frozen base (models.PPOModels): the reference is the SFT model
itself (merged into the base, adapters off), so it costs no weights.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from instructcli import console, data, judge, models, parallel, rlhf
from instructcli.config import OLD_LOGPROBS, PPOConfig, check_choice, check_sampling, to_dict
from instructcli.errors import InstructError
from instructcli.models import POLICY, REWARD, VALUE

MAX_BAD_STEPS = 5


def train(cfg: PPOConfig) -> Path:
    mc = cfg.model
    console.set_quiet(cfg.quiet)
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise InstructError("--ptx-coef > 0 needs --ptx-data (pretraining rows); --ptx-coef 0 is plain PPO", 2)
    check_choice("old-logprobs", cfg.old_logprobs, OLD_LOGPROBS)
    check_sampling(cfg.temperature, cfg.top_p, zero_ok=False)
    if cfg.rollout_batch_size % cfg.mini_batch_size:
        raise InstructError("--rollout-batch-size must be a multiple of --mini-batch-size", 2)
    run = models.RunDir(cfg.out, cfg.overwrite, cfg.resume)

    # 0. data and models
    prompts = data.load(cfg.prompts, "prompts", cfg.skip_invalid, console.warn)
    ptx = data.load(cfg.ptx_data, "pretraining", cfg.skip_invalid, console.warn) if cfg.ptx_coef > 0 else None
    rule = judge.load_rule(cfg.reward) if ".py:" in cfg.reward else None
    policy_source = models.resolve(cfg.policy, console.log)
    models.refuse_reward_model(policy_source, "--policy")
    tok = models.load_tokenizer(policy_source, mc.trust_remote_code)
    queries, _ = data.encode_prompts(tok, prompts, cfg.max_prompt_len)
    ptx_set = []
    for i, r in enumerate(ptx.records if ptx else []):
        ids = data.encode_text(tok, r.text)
        fitted = data.fit_length(ids, ids, cfg.max_len, "truncate", data.OverflowStats(), f"{cfg.ptx_data}: {i + 1}")
        if fitted:
            ptx_set.append(fitted)
    models.seed_everything(cfg.seed)
    device = models.pick_device()
    m, rm_source = models.ppo_models(policy_source, cfg.reward, mc, device, console.log)
    m.eval()  # no dropout: old and new log-probs must come from the same function
    params = [p for p in m.parameters() if p.requires_grad]
    policy_params, value_params = m.param_groups()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # as sft and rm (torch's default is 0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    kl_ctl = (rlhf.AdaptiveKLController(cfg.kl, cfg.target_kl, cfg.horizon) if cfg.target_kl > 0
              else rlhf.FixedKLController(cfg.kl))
    # old log-probs from the sampling loop save a forward per step; on a quantized or half-precision base,
    # cached decoding and a full forward differ by more than float noise, so there a full forward, as the update
    # runs, recomputes them
    rollout_logprobs = cfg.old_logprobs == "rollout" or (
        cfg.old_logprobs == "auto" and mc.quant == "none" and models.torch_dtype(mc.dtype, device) == torch.float32)
    console.log(f"ppo: {len(queries)} prompts, {cfg.steps} steps of {cfg.rollout_batch_size} rollouts, "
                f"{sum(p.numel() for p in params):,} trainable parameters (policy + value) on one {mc.quant} base "
                f"on {device}; kl {cfg.kl}{f' -> target {cfg.target_kl}' if cfg.target_kl else ''}, "
                f"ptx {cfg.ptx_coef if ptx else 0}; old log-probs "
                f"{'from the sampling loop' if rollout_logprobs else 'recomputed'}")
    B = cfg.rollout_batch_size  # per process; each process rolls out its own prompts
    start, state = 0, None
    if cfg.resume and (state := run.load_checkpoint(m, optimizer, scheduler)):
        start, kl_ctl.value = state["step"], state["extra"]["kl_coef"]
        data.check_resume(state["extra"], B * parallel.world, "rollouts")
        console.log(f"resumed from step {start}")
    parallel.broadcast_params(params)  # every process starts from the same weights
    if parallel.world > 1 and not state:  # own samples per process
        models.seed_everything(cfg.seed + parallel.rank)
    run.create()
    metrics = console.Metrics(run.metrics_path)
    order = data.EpochOrder(len(queries), cfg.seed)
    guard = console.NonFiniteGuard(MAX_BAD_STEPS)

    def forward(sel, adapter):
        """Policy logits (POLICY), reference logits (None: adapters off) or values (VALUE) at the positions that
        predict each response token of rollout rows `sel`. The rows are collated on their own, to their longest
        prompt and response, so no work goes to columns that are padding in all of them; the LM head never
        runs over the prompt."""
        ids, attn, pos, P = data.collate_rollout([batch_q[i] for i in sel], [responses[i] for i in sel],
                                                 tok.pad_token_id, device)
        if adapter == VALUE:  # the value of each state: what the RM-shaped head reads there (score_features)
            m.use(VALUE)
            h = models.hidden_states(m.lm, ids, attn, pos, layers=m.layers).float()
            starts = torch.full((len(sel),), P, device=device)
            return m.value_head(models.score_features(h, attn, starts, m.pool)[:, P - 1:-1]).squeeze(-1)
        m.use(POLICY)
        with m.lm.disable_adapter() if adapter is None else contextlib.nullcontext():
            logits = models.logits_from(m.lm, ids, attn, pos, P - 1)
        return logits[:, :-1].float() / cfg.temperature

    def logprobs_of(sel, adapter, entropy=False):
        logits = forward(sel, adapter)
        lp = rlhf.logprobs_from_logits(logits, resp[sel, :logits.shape[1]])
        return (lp, rlhf.entropy_from_logits(logits)) if entropy else (lp,)

    def over_rollout(f):
        """f(rows) -> tensors of (len(rows), their response width), for every rollout row in chunks of
        --mini-batch-size rows of similar length (little padding, bounded memory); returned as (B, R) tensors in
        rollout order, 0 past each response."""
        outs = None
        for sel in data.length_chunks([len(q) + len(r) for q, r in zip(batch_q, responses)], cfg.mini_batch_size):
            ys = f(sel)
            outs = outs or [torch.zeros(B, resp.shape[1], device=device) for _ in ys]
            for out, y in zip(outs, ys):
                out[sel, :y.shape[1]] = y
        return outs

    def score(idx, ended) -> torch.Tensor:
        if rule:
            texts = [tok.decode(x, skip_special_tokens=True).strip() for x in responses]
            s = torch.tensor([float(rule(prompts.records[i].prompt, t)) for i, t in zip(idx, texts)], device=device)
        else:  # the tokens as sampled: an answer cut off at --max-new-tokens has no end-of-turn token, and the
            # RM (trained with data.encode_responses, which reads the score at that token) sees it
            enc = [q + r for q, r in zip(batch_q, responses)]
            s = torch.zeros(len(enc), device=device)
            m.use(REWARD)
            for sel in data.length_chunks([len(e) for e in enc], cfg.mini_batch_size):
                batch = data.collate_sequences([enc[i] for i in sel], tok.pad_token_id)
                starts = torch.tensor([len(batch_q[i]) for i in sel], device=device)
                s[sel] = m.reward.score(batch["input_ids"].to(device), batch["attention_mask"].to(device), starts)
        s = s - cfg.missing_eos_penalty * (~ended).float()
        return s.clamp(-cfg.reward_clip, cfg.reward_clip) if cfg.reward_clip > 0 else s

    last = {}
    step = start
    oom = console.OutOfMemory(lambda: (
        f"at step {step + 1} with --rollout-batch-size {B}, --mini-batch-size {cfg.mini_batch_size}, --max-new-tokens "
        f"{cfg.max_new_tokens}: try smaller ones, --quant 8bit, or --ptx-batch-size below {cfg.ptx_batch_size}"))
    with console.Interrupt() as interrupt, console.Bar(cfg.steps, "ppo", completed=start) as bar, oom:
        for step in range(start, cfg.steps):
            # 1. rollout: sample responses from the policy
            t0 = time.time()
            idx = [order[(step * parallel.world + parallel.rank) * B + i] for i in range(B)]
            batch_q = [queries[i] for i in idx]
            m.use(POLICY)
            out = models.generate(m.lm, tok, batch_q, 1, cfg.temperature, cfg.top_p, cfg.max_new_tokens, device,
                                  logprobs=rollout_logprobs)
            out, lp, ent = out if rollout_logprobs else (out, None, None)
            responses = [r[0] for r in out]
            ended = torch.tensor([data.ended(tok, r) for r in responses], device=device)
            ids, attn, _, P = data.collate_rollout(batch_q, responses, tok.pad_token_id, device)
            resp, mask = ids[:, P:], attn[:, P:].float()
            rollout_s = time.time() - t0

            # 2. score; log-probs under policy (unless the sampling loop gave them) and reference; values
            t1 = time.time()
            with torch.no_grad():
                scores = score(idx, ended)
                if rollout_logprobs:
                    logprobs = lp
                else:
                    logprobs, ent = over_rollout(lambda sel: logprobs_of(sel, POLICY, entropy=True))
                entropy = rlhf.masked_mean(ent, mask).item()
                # the reference: the SFT model, which is the base itself with adapters off
                ref_logprobs = over_rollout(lambda sel: logprobs_of(sel, None))[0]
                values = over_rollout(lambda sel: (forward(sel, VALUE),))[0]

                # 3. rewards (per-token KL penalty + score on the last token) and GAE advantages
                rewards, kl = rlhf.compute_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value)
                advantages, returns = rlhf.gae(values, rewards, mask, cfg.gamma, cfg.lam)
                if cfg.whiten:  # over the global batch
                    advantages = rlhf.whiten(advantages, mask, reduce=parallel.sum_tensor)
            if parallel.any_(not torch.isfinite(scores).all() or not torch.isfinite(advantages).all()):
                guard.ok(step + 1, float("nan"), 0.0, optimizer)  # warns; aborts after repeated failures
                continue

            # 4. optimise: PPO epochs over mini-batches; policy (+ ptx) then value, one optimizer step each
            stats = {k: [] for k in ("policy_loss", "value_loss", "ptx_loss", "grad_norm", "value_grad_norm",
                                     "clipfrac", "approx_kl", "vf_clipfrac")}
            for _ in range(cfg.ppo_epochs):
                for mb in torch.randperm(B).split(cfg.mini_batch_size):
                    sel = mb.tolist()
                    logits = forward(sel, POLICY)
                    R = logits.shape[1]  # the mini-batch's longest response; the columns after it are padding

                    def cut(x):
                        return x[sel, :R]

                    new_logprobs = rlhf.logprobs_from_logits(logits, cut(resp))
                    del logits
                    pg_loss, pg_stats = rlhf.policy_loss(new_logprobs, cut(logprobs), cut(advantages), cut(mask),
                                                         cfg.cliprange)
                    ptx_loss = torch.zeros((), device=device)
                    if ptx_set:  # the pretraining term: KL from the SFT model's predictions of the text
                        pick = torch.randint(len(ptx_set), (cfg.ptx_batch_size,)).tolist()
                        pb = data.collate([ptx_set[i] for i in pick], tok.pad_token_id)
                        pb = [pb[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
                        ptx_logits, _ = models.labelled_logits(m.lm, *pb)
                        with torch.no_grad(), m.lm.disable_adapter():
                            ref_ptx_logits, _ = models.labelled_logits(m.lm, *pb)
                        ptx_loss = rlhf.kl_to_reference(ptx_logits, ref_ptx_logits)
                        del ptx_logits, ref_ptx_logits
                    (pg_loss + cfg.ptx_coef * ptx_loss).backward()
                    vpred = forward(sel, VALUE)
                    vf_loss, vf_stats = rlhf.value_loss(vpred, cut(values), cut(returns), cut(mask),
                                                        cfg.cliprange_value)
                    (cfg.vf_coef * vf_loss).backward()
                    parallel.sync_grads(params, average=True)  # each process's mini-batch counts the same
                    total = parallel.mean(pg_loss.item() + cfg.ptx_coef * ptx_loss.item()
                                          + cfg.vf_coef * vf_loss.item())[0]
                    grad_norm, value_grad_norm = rlhf.clip_grad_norms([policy_params, value_params],
                                                                      cfg.max_grad_norm)
                    if not guard.ok(step + 1, total, grad_norm + value_grad_norm, optimizer):
                        continue
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    for k, v in (("policy_loss", pg_loss.item()), ("value_loss", vf_loss.item()),
                                 ("ptx_loss", ptx_loss.item()), ("grad_norm", grad_norm),
                                 ("value_grad_norm", value_grad_norm), *pg_stats.items(), *vf_stats.items()):
                        stats[k].append(v)
            # metrics and the KL controller use means over all processes' rollouts
            local = {"score": scores.mean().item(), "reward": rewards.sum(1).mean().item(),
                     "kl": kl.sum(1).mean().item(), "entropy": entropy,
                     **{k: sum(v) / len(v) for k, v in stats.items() if v},
                     "response_len": mask.sum(1).mean().item(), "no_eos": (~ended).float().mean().item(),
                     "tokens_per_s": mask.sum().item() / max(rollout_s, 1e-9) * parallel.world,
                     "rollout_s": rollout_s, "optimise_s": time.time() - t1}
            if parallel.world > 1:  # every process updates kl_coef alike
                local = dict(zip(local, parallel.mean(*local.values())))
            mean_kl = local["kl"]
            kl_coef = kl_ctl.value
            kl_ctl.update(mean_kl, B * parallel.world)

            done = step + 1
            last = {"step": done, **local, "kl_coef": kl_coef, "peak_mem_mb": round(console.peak_memory_mb(), 1)}
            metrics.write(last)
            bar.update(1, f"score {last['score']:.3f} kl {mean_kl:.3f}")
            console.log(f"step {done}: score {last['score']:.3f} kl {mean_kl:.3f} "
                        f"len {last['response_len']:.1f} ({rollout_s:.1f}s rollout, {last['optimise_s']:.1f}s optimise)")
            stop = parallel.any_(interrupt.requested)  # every process stops at the same step
            if (cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps) or (stop and done < cfg.steps):
                run.save_checkpoint(done, m, optimizer, scheduler,
                                    {"kl_coef": kl_ctl.value, "rollouts_per_step": B * parallel.world},
                                    cfg.keep_checkpoints)
            if stop and done < cfg.steps:
                metrics.close()
                console.stopped(done)
                raise KeyboardInterrupt
    metrics.close()

    # 5. save the policy adapter (a run dir that sample/export accept like an sft one) and the value head
    from safetensors.torch import save_file

    if parallel.main:
        save_file({k: v.detach().cpu().contiguous() for k, v in m.value_head.state_dict().items()},
                  str(run.work / "value_head.safetensors"))
    lineage = models.lineage(policy_source)
    if rm_source:
        lineage["parents"].append({"dir": str(Path(rm_source.run_dir).resolve()),
                                   "hash": models.dir_hash(rm_source.run_dir), "stage": "rm"})
    out = run.finish(m.lm, tok, {
        "stage": "ppo",
        **lineage,
        "data": {"prompts": prompts.describe(), "ptx": ptx.describe() if ptx else None},
        "config": to_dict(cfg),
        "metrics": last,
    }, adapters=[POLICY])
    console.log(f"ppo: done; saved to {out}")
    return out
