"""Stage 3, PPO with a per-token KL penalty and PPO-ptx (cleanrl style: numbered phases, one line per loss term).

Policy, reference, reward and value share one frozen base (models.PPOModels): the reference is the SFT model
itself (merged into the base, adapters off), so it costs no weights.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import NamedTuple

import torch

from instructcli import batches, checkpoint, console, data, forward, generate, judge, loop, models, parallel, rlhf, sources, tokens
from instructcli.config import PPOConfig, to_dict
from instructcli.models import POLICY, REWARD, VALUE


KEEP_LOGITS_BYTES = 1 << 30  # the most the sampling loop's logits may take to spare --stop-kl a policy forward


class Rollout(NamedTuple):
    """One step's samples: each row's prompt and response ids, and the responses right-padded to (B, R)."""

    queries: list[list[int]]
    responses: list[list[int]]
    tokens: torch.Tensor  # (B, R) response token ids
    mask: torch.Tensor  # (B, R) 1.0 on response tokens


def row_chunks(ro: Rollout, rows: list[int], size: int) -> list[list[int]]:
    """Rollout rows `rows`, `size` at a time, in order of prompt + response length (little padding)."""
    lengths = [len(ro.queries[i]) + len(ro.responses[i]) for i in rows]
    return [[rows[j] for j in part] for part in batches.length_chunks(lengths, size)]


def new_rollout(queries: list[list[int]], responses: list[list[int]], pad_id: int, device: str) -> Rollout:
    ids, attn, _, start = batches.collate_rollout(queries, responses, pad_id, device)
    return Rollout(queries, responses, ids[:, start:], attn[:, start:].float())


def response_logits(nets: models.PPOModels, ro: Rollout, rows: list[int], pad_id: int, device: str,
                    temperature: float, reference: bool = False) -> torch.Tensor:
    """Policy logits (or, with `reference`, the SFT model's: the base with adapters off) at the positions that
    predict each response token of rollout rows `rows`. The rows are collated on their own, to their longest
    prompt and response, so no work goes to columns that are padding in all of them; the LM head never runs
    over the prompt."""
    ids, attn, pos, start = batches.collate_rollout([ro.queries[i] for i in rows], [ro.responses[i] for i in rows],
                                                 pad_id, device)
    nets.use(POLICY)
    with nets.reference() if reference else contextlib.nullcontext():
        logits = forward.logits_from(nets.lm, ids, attn, pos, start - 1)
    return logits[:, :-1].float() / temperature


def response_values(nets: models.PPOModels, ro: Rollout, rows: list[int], pad_id: int, device: str) -> torch.Tensor:
    """The value of each state before a response token of rows `rows`: what the RM-shaped value head reads there
    (forward.score_features)."""
    ids, attn, pos, start = batches.collate_rollout([ro.queries[i] for i in rows], [ro.responses[i] for i in rows],
                                                 pad_id, device)
    nets.use(VALUE)
    return values_from(nets, state_features(nets, ids, attn, pos, start), start)


def state_features(nets: models.PPOModels, ids, attn, pos, start: int,
                   adapter_names: list[str] | None = None) -> torch.Tensor:
    """What the reward and value heads read at every position of a collated rollout (responses from column
    `start`): forward.score_features after the RM's layers, through whichever adapter is active (or, with
    `adapter_names`, each row's own)."""
    h = forward.hidden_states(nets.lm, ids, attn, pos, layers=nets.layers, adapter_names=adapter_names).float()
    return forward.score_features(h, attn, torch.full((len(ids),), start, device=ids.device), nets.pool)


def values_from(nets: models.PPOModels, feats: torch.Tensor, start: int) -> torch.Tensor:
    """The value of each state before a response token, from state_features."""
    return nets.value_head(feats[:, start - 1:-1]).squeeze(-1)


def response_logprobs(nets: models.PPOModels, ro: Rollout, rows: list[int], pad_id: int, device: str,
                      temperature: float) -> torch.Tensor:
    """The policy's log-probs of rows' response tokens (with gradient: the update's); see response_logits."""
    logits = response_logits(nets, ro, rows, pad_id, device, temperature)
    return rlhf.logprobs_from_logits(logits, ro.tokens[rows, :logits.shape[1]])


def logprobs_and_kl(nets: models.PPOModels, ro: Rollout, rows: list[int], pad_id: int, device: str,
                    temperature: float, policy: bool, kl_temperature: float,
                    rollout_logits: torch.Tensor | None = None) -> tuple:
    """For rollout rows `rows`, from one forward through the SFT model and at most one through the policy: the
    SFT model's log-probs of the response tokens at `temperature`; with `policy`, then the policy's log-probs
    and entropies (when the sampling loop did not give them); with `kl_temperature` > 0, last, the KL of the
    policy's next-token distributions from the SFT model's at that temperature at each position
    (rlhf.tempered_kl: what --stop-kl reads), the policy's read from `rollout_logits` (the sampling loop's,
    (B, R, V)) when given and no policy forward is needed otherwise."""
    ref = response_logits(nets, ro, rows, pad_id, device, 1.0, reference=True)
    targets = ro.tokens[rows, :ref.shape[1]]
    out = (rlhf.logprobs_from_logits(ref / temperature, targets),)
    if not policy and kl_temperature and rollout_logits is not None:
        return out + (rlhf.tempered_kl(rollout_logits[rows, :ref.shape[1]], ref, kl_temperature),)
    if policy or kl_temperature:
        logits = response_logits(nets, ro, rows, pad_id, device, 1.0)
        if policy:
            out += (rlhf.logprobs_from_logits(logits / temperature, targets),
                    rlhf.entropy_from_logits(logits / temperature))
        if kl_temperature:
            out += (rlhf.tempered_kl(logits, ref, kl_temperature),)
    return out


def over_rollout(ro: Rollout, chunk: int, f) -> list[torch.Tensor]:
    """f(rows) -> tensors of (len(rows), their response width), for every rollout row in chunks of `chunk`
    rows of similar length (little padding, bounded memory); returned as (B, R) tensors in rollout order, 0
    past each response."""
    outs = None
    for rows in row_chunks(ro, list(range(len(ro.queries))), chunk):
        ys = f(rows)
        outs = outs or [torch.zeros(ro.tokens.shape, device=ro.tokens.device) for _ in ys]
        for out, y in zip(outs, ys):
            out[rows, :y.shape[1]] = y
    return outs


def rm_scores_and_values(nets: models.PPOModels, ro: Rollout, pad_id: int, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The RM's normalised scores of the tokens as sampled (an answer cut off at --max-new-tokens has no
    end-of-turn token, and the RM, trained with tokens.encode_responses, which reads the score at that token,
    sees it), and the values of every response state (as response_values), from one forward per chunk: reward
    and value read the same features of the same sequences through different adapters, so each row goes into
    one batch twice, once through each adapter (peft's mixed-adapter batch; no gradient). Half the forwards,
    and on a GPU half the kernel launches, of running the two apart."""
    device = ro.tokens.device
    scores = torch.zeros(len(ro.queries), device=device)
    values = torch.zeros(ro.tokens.shape, device=device)
    for rows in row_chunks(ro, list(range(len(ro.queries))), chunk):
        ids, attn, pos, start = batches.collate_rollout([ro.queries[i] for i in rows],
                                                        [ro.responses[i] for i in rows], pad_id, device)
        n = len(rows)
        feats = state_features(nets, ids.repeat(2, 1), attn.repeat(2, 1), pos.repeat(2, 1), start,
                               adapter_names=[REWARD] * n + [VALUE] * n)
        scores[rows] = nets.reward.normalise(nets.reward.read(feats[:n], attn))
        v = values_from(nets, feats[n:], start)
        values[rows, :v.shape[1]] = v
    return scores, values


def train(cfg: PPOConfig) -> Path:
    mc = cfg.model
    console.set_quiet(cfg.quiet)
    run = checkpoint.RunDir(cfg.out, cfg.overwrite, cfg.resume)

    # 0. data and models
    prompts = data.load(cfg.prompts, "prompts", cfg.skip_invalid, console.warn, cfg.columns, cfg.split)
    ptx = data.load(cfg.ptx_data, "pretraining", cfg.skip_invalid, console.warn, cfg.columns, cfg.split) if cfg.ptx_coef > 0 else None
    rule = judge.load_rule(cfg.reward) if ".py:" in cfg.reward else None
    policy_source = sources.resolve(cfg.policy, console.log)
    sources.refuse_reward_model(policy_source, "--policy")
    tok = models.load_tokenizer(policy_source, mc.trust_remote_code)
    queries, _ = tokens.encode_prompts(tok, prompts, cfg.max_prompt_len)
    ptx_set = []
    for i, r in enumerate(ptx.records if ptx else []):
        ids = tokens.encode_text(tok, r.text)
        fitted = tokens.fit_length(ids, ids, cfg.max_len, "truncate", tokens.OverflowStats(), f"{cfg.ptx_data}: {i + 1}")
        if fitted:
            ptx_set.append(fitted)
    checkpoint.seed_everything(cfg.seed)
    device = models.pick_device()
    nets, rm_source = models.ppo_models(policy_source, cfg.reward, mc, device, console.log)
    nets.eval()  # no dropout: old and new log-probs must come from the same function
    params = [p for p in nets.parameters() if p.requires_grad]
    policy_params, value_params = nets.param_groups()
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)  # as sft and rm (torch's default is 0.01)
    total_updates = cfg.steps * cfg.ppo_epochs * (cfg.rollout_batch_size // cfg.mini_batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: rlhf.lr_lambda(s, total_updates, 0, cfg.schedule))
    kl_ctl = (rlhf.AdaptiveKLController(cfg.kl, cfg.target_kl, cfg.horizon, floor=cfg.kl) if cfg.target_kl > 0
              else rlhf.FixedKLController(cfg.kl))
    # old log-probs from the sampling loop save a forward per step; on a quantized or half-precision base,
    # cached decoding and a full forward differ by more than float noise, so there a full forward, as the update
    # runs, recomputes them
    exact_loop = mc.quant == "none" and models.torch_dtype(mc.dtype, device) == torch.float32
    rollout_logprobs = cfg.old_logprobs == "rollout" or (cfg.old_logprobs == "auto" and exact_loop)
    # there too the policy's distributions --stop-kl reads are the sampling loop's logits (one policy forward a
    # step fewer: a tenth of a CPU step), where the eager loop samples and they take at most KEEP_LOGITS_BYTES
    keep_logits = bool(rollout_logprobs and exact_loop and cfg.stop_kl and not generate.static(cfg.decode, device)
                       and cfg.rollout_batch_size * cfg.max_new_tokens * nets.lm.config.vocab_size * 4
                       <= KEEP_LOGITS_BYTES)
    console.log(f"ppo: {len(queries)} prompts, {cfg.steps} steps of {cfg.rollout_batch_size} rollouts, "
                f"{sum(p.numel() for p in params):,} trainable parameters (policy + value) on one {mc.quant} base "
                f"on {device}; kl {cfg.kl}{f' -> target {cfg.target_kl}' if cfg.target_kl else ''}, "
                f"ptx {cfg.ptx_coef if ptx else 0}; old log-probs "
                f"{'from the sampling loop' if rollout_logprobs else 'recomputed'}")
    rollout_size = cfg.rollout_batch_size  # per process; each process rolls out its own prompts
    inputs = {"prompts": (cfg.prompts, prompts.sha256), **({"ptx_data": (cfg.ptx_data, ptx.sha256)} if ptx else {}),
              "reward": (cfg.reward, sources.dir_hash(rm_source.run_dir) if rm_source else
                         checkpoint.file_sum(Path(cfg.reward.rpartition(":")[0]))[1])}
    start, state, metrics = loop.start_or_resume(run, nets, optimizer, scheduler, params, cfg.resume, cfg.seed,
                                                 rollout_size * parallel.world,
                                                 checkpoint.identity(cfg, inputs, policy_source), "rollouts", config=cfg)
    kl_history = []  # the KL --stop-kl reads, per step
    if state:
        kl_ctl.value = state["extra"]["kl_coef"]
        kl_history = state["extra"].get("kl_history", [])
    order = checkpoint.EpochOrder(len(queries), cfg.seed)
    guard = loop.NonFiniteGuard(f"last good checkpoint in {run.ckpt_root}")

    pad_id, chunk = tok.pad_token_id, min(cfg.micro_batch_size or cfg.mini_batch_size, cfg.mini_batch_size)

    last = {}
    step = start
    oom = loop.OutOfMemory(lambda: (
        f"at step {step + 1} with --rollout-batch-size {rollout_size}, --mini-batch-size {cfg.mini_batch_size}, "
        f"--micro-batch-size {chunk}, --max-new-tokens "
        f"{cfg.max_new_tokens}: try smaller ones, --quant 8bit, or --ptx-batch-size below {cfg.ptx_batch_size}"))
    with loop.Interrupt() as interrupt, console.Bar(cfg.steps, "ppo", completed=start) as bar, oom:
        for step in range(start, cfg.steps):
            # 1. rollout: sample responses from the policy
            t0 = time.time()
            idx = [order[(step * parallel.world + parallel.rank) * rollout_size + i] for i in range(rollout_size)]
            batch_q = [queries[i] for i in idx]
            nets.use(POLICY)
            out = generate.generate(nets.lm, tok, batch_q, 1, cfg.temperature, cfg.top_p, cfg.max_new_tokens, device,
                                    logprobs=rollout_logprobs, decode=cfg.decode, keep_logits=keep_logits)
            lp = ent = kept = None
            if keep_logits:
                out, lp, ent, kept = out
            elif rollout_logprobs:
                out, lp, ent = out
            ro = new_rollout(batch_q, [r[0] for r in out], pad_id, device)
            mask = ro.mask
            ended = torch.tensor([tokens.ended(tok, r) for r in ro.responses], device=device)
            rollout_s = time.time() - t0

            # 2. score; log-probs under policy (unless the sampling loop gave them) and reference; values
            t1 = time.time()
            with torch.no_grad():
                # the reference: the SFT model, which is the base itself with adapters off (first, so the
                # sampling loop's logits are freed before the RM's forwards)
                stop_t = cfg.stop_kl_temperature if cfg.stop_kl else 0.0
                outs = over_rollout(ro, chunk, lambda rows: logprobs_and_kl(
                    nets, ro, rows, pad_id, device, cfg.temperature, not rollout_logprobs, stop_t, kept))
                del kept
                ref_logprobs = outs[0]
                logprobs, ent = (lp, ent) if rollout_logprobs else outs[1:3]
                entropy = rlhf.masked_mean(ent, mask).item()
                if rule:
                    texts = [tok.decode(x, skip_special_tokens=True).strip() for x in ro.responses]
                    scores = torch.tensor([float(rule(prompts.records[i].prompt, t)) for i, t in zip(idx, texts)],
                                          device=device)
                else:  # with the values below, from the same forwards
                    scores, values = rm_scores_and_values(nets, ro, pad_id, chunk)
                scores = scores - cfg.missing_eos_penalty * (~ended).float()
                if cfg.reward_clip > 0:
                    scores = scores.clamp(-cfg.reward_clip, cfg.reward_clip)
                if rule:
                    values = over_rollout(ro, chunk, lambda rows: (response_values(nets, ro, rows, pad_id, device),))[0]

                # 3. rewards (per-token KL penalty + score on the last token) and GAE advantages
                rewards, kl = rlhf.compute_rewards(scores, logprobs, ref_logprobs, mask, kl_ctl.value)
                advantages, returns = rlhf.gae(values, rewards, mask, cfg.gamma, cfg.lam)
                if cfg.whiten:  # over the global batch
                    advantages = rlhf.whiten(advantages, mask, reduce=parallel.sum_tensor)
            if parallel.any_process(not torch.isfinite(scores).all() or not torch.isfinite(advantages).all()):
                guard.ok(step + 1, float("nan"), 0.0, optimizer)  # warns; aborts after repeated failures
                continue
            # the budget is checked before the update, so the policy saved is the one whose KL was measured
            if cfg.stop_kl:  # the same on every process: a mean over all rollouts
                step_kl = parallel.mean((outs[-1] * mask).sum(1).mean().item())[0]
                # a KL is >= 0, but the sampling loop's logits and a full forward differ by float noise, which at
                # a KL near 0 (the first step) can read as -1e-7; anything more negative is left to show
                kl_history.append(0.0 if -1e-4 < step_kl < 0 else step_kl)
            stopping = rlhf.kl_budget_spent(kl_history, cfg.stop_kl)

            # 4. optimise: PPO epochs over mini-batches; policy (+ ptx) then value, one optimizer step each
            stats = {k: [] for k in ("policy_loss", "value_loss", "ptx_loss", "grad_norm", "value_grad_norm",
                                     "clipfrac", "approx_kl", "vf_clipfrac")}
            for _ in range(0 if stopping else cfg.ppo_epochs):
                for mb in torch.randperm(rollout_size).split(cfg.mini_batch_size):
                    mb_rows = mb.tolist()
                    # the mini-batch's losses are means over its response tokens; a micro-batch adds its share
                    # (its tokens / the mini-batch's) of that mean, so the summed gradient is the mini-batch's
                    mb_tokens = mask[mb_rows].sum().clamp(min=1)
                    parts = {"policy_loss": 0.0, "value_loss": 0.0, "clipfrac": 0.0, "approx_kl": 0.0,
                             "vf_clipfrac": 0.0}
                    for rows in row_chunks(ro, mb_rows, chunk):
                        share = (mask[rows].sum() / mb_tokens).item()
                        new_logprobs = response_logprobs(nets, ro, rows, pad_id, device, cfg.temperature)
                        width = new_logprobs.shape[1]  # these rows' longest response; columns after it are padding

                        def cut(x):
                            return x[rows, :width]

                        pg_loss, pg_stats = rlhf.policy_loss(new_logprobs, cut(logprobs), cut(advantages),
                                                             cut(mask), cfg.cliprange)
                        (share * pg_loss).backward()
                        del new_logprobs
                        vpred = response_values(nets, ro, rows, pad_id, device)
                        vf_loss, vf_stats = rlhf.value_loss(vpred, cut(values), cut(returns), cut(mask),
                                                            cfg.cliprange_value)
                        (share * cfg.vf_coef * vf_loss).backward()
                        for k, v in (("policy_loss", pg_loss.item()), ("value_loss", vf_loss.item()),
                                     *pg_stats.items(), *vf_stats.items()):
                            parts[k] += share * v
                    ptx_loss = torch.zeros((), device=device)
                    if ptx_set:  # the pretraining term: KL from the SFT model's predictions of the text
                        pick = torch.randint(len(ptx_set), (cfg.ptx_batch_size,)).tolist()
                        pb = batches.collate([ptx_set[i] for i in pick], pad_id)
                        pb = [pb[k].to(device) for k in ("input_ids", "attention_mask", "labels")]
                        nets.use(POLICY)
                        ptx_logits, _ = forward.labelled_logits(nets.lm, *pb)
                        with torch.no_grad(), nets.reference():
                            ref_ptx_logits, _ = forward.labelled_logits(nets.lm, *pb)
                        ptx_loss = rlhf.kl_to_reference(ptx_logits, ref_ptx_logits)
                        del ptx_logits, ref_ptx_logits
                        (cfg.ptx_coef * ptx_loss).backward()
                    parallel.sync_grads(params, average=True)  # each process's mini-batch counts the same
                    total = parallel.mean(parts["policy_loss"] + cfg.ptx_coef * ptx_loss.item()
                                          + cfg.vf_coef * parts["value_loss"])[0]
                    grad_norm, value_grad_norm = rlhf.clip_grad_norms([policy_params, value_params],
                                                                      cfg.max_grad_norm)
                    if loop.optimizer_step(guard, step + 1, total, grad_norm + value_grad_norm, optimizer,
                                           scheduler) is None:
                        continue
                    for k, v in (*parts.items(), ("ptx_loss", ptx_loss.item()), ("grad_norm", grad_norm),
                                 ("value_grad_norm", value_grad_norm)):
                        stats[k].append(v)
            # metrics and the KL controller use means over all processes' rollouts
            local = {"score": scores.mean().item(), "reward": rewards.sum(1).mean().item(),
                     "kl": kl.sum(1).mean().item(), "entropy": entropy,
                     **{k: sum(v) / len(v) for k, v in stats.items() if v},
                     "response_len": mask.sum(1).mean().item(), "no_eos": (~ended).float().mean().item(),
                     "tokens_per_s": mask.sum().item() / max(rollout_s, 1e-9) * parallel.world,
                     "rollout_s": rollout_s, "optimise_s": time.time() - t1,
                     **({"kl_stop": kl_history[-1]} if cfg.stop_kl else {})}
            if parallel.world > 1:  # every process updates kl_coef alike
                local = dict(zip(local, parallel.mean(*local.values())))
            mean_kl = local["kl"]
            kl_coef = kl_ctl.value
            kl_ctl.update(mean_kl, rollout_size * parallel.world)

            done = step + 1
            last = {"step": done, **local, "kl_coef": kl_coef, "peak_mem_mb": round(console.peak_memory_mb(), 1)}
            metrics.write(last)
            bar.update(1, f"score {last['score']:.3f} kl {mean_kl:.3f}")
            console.log(f"step {done}: score {last['score']:.3f} kl {mean_kl:.3f} "
                        f"len {last['response_len']:.1f} ({rollout_s:.1f}s rollout, {last['optimise_s']:.1f}s optimise)")
            if stopping:
                w = rlhf.KL_BUDGET_WINDOW
                console.log(f"ppo: the KL to SFT at T {cfg.stop_kl_temperature} averaged "
                            f"{sum(kl_history[-w:]) / w:.2f} nats over the last {w} steps' rollouts, the --stop-kl "
                            f"budget {cfg.stop_kl}: stopping at step {done} of {cfg.steps} without its update, "
                            f"saving the policy that drew them")
                last["stopped_at_kl_budget"] = True
                break
            loop.checkpoint_or_stop(run, done, cfg.steps, interrupt, cfg.save_every, cfg.keep_checkpoints, nets,
                                    optimizer, scheduler, {"kl_coef": kl_ctl.value, "kl_history": kl_history,
                                                           "rollouts_per_step": rollout_size * parallel.world}, metrics)
    metrics.close()

    # 5. save the policy adapter (a run dir that sample/export accept like an sft one) and the value head
    from safetensors.torch import save_file

    if parallel.main:
        save_file({k: v.detach().cpu().contiguous() for k, v in nets.value_head.state_dict().items()},
                  str(run.work / "value_head.safetensors"))
    lineage = sources.lineage(policy_source)
    if rm_source:
        lineage["parents"].append({"dir": str(Path(rm_source.run_dir).resolve()),
                                   "hash": sources.dir_hash(rm_source.run_dir), "stage": "rm"})
    out = run.finish(nets.lm, tok, {
        "stage": "ppo",
        **lineage,
        "data": {"prompts": prompts.describe(), "ptx": ptx.describe() if ptx else None},
        "config": to_dict(cfg),
        "metrics": last,
    }, adapters=[POLICY])
    console.log(f"ppo: done; saved to {out}")
    return out
