"""ppo on the tiny model: reward goes up with a programmatic reward, ptx keeps the LM loss down, resume is
exact, the 8-bit path runs, and only one copy of the base weights exists."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import SAMPLES, write_jsonl
from instructcli import batches, checkpoint, config as C, data, forward, loop, models, ppo, rlhf, sft, sources, tokens

LORA = "q_proj,v_proj,lm_head"  # the tiny random model needs its output layer adapted to move quickly


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("ppo")
    demos = write_jsonl(d / "demos.jsonl", [{"prompt": f"Say {w}.", "response": w} for w in "abcdefgh"])
    sft_dir = sft.train(C.SFTConfig(data=str(demos), out=str(d / "sft"), quiet=True,
                                    model=C.ModelConfig(model=str(tiny_dir)),
                                    train=C.TrainConfig(max_steps=2, batch_size=4, eval_frac=0)))
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in
                                                ["cats", "rain", "tea", "maps", "boats", "snow", "bread", "clocks"]])
    rule = d / "rule.py"
    rule.write_text("def count_e(prompt, response):\n    return float(response.count('e'))\n")
    return d, sft_dir, prompts, f"{rule}:count_e"


def cfg(setup, out, **kw):
    d, sft_dir, prompts, rule = setup
    base = dict(policy=str(sft_dir), reward=rule, prompts=str(prompts), out=str(out), quiet=True, ptx_coef=0.0,
                steps=4, rollout_batch_size=8, mini_batch_size=4, max_new_tokens=12, lr=1e-2, save_every=0, stop_kl=0.0,
                model=C.ModelConfig(lora_targets=LORA, lora_dropout=0.0))
    base.update(kw)
    return C.PPOConfig(**base)


def metrics(d):
    return [json.loads(l) for l in (d / "metrics.jsonl").read_text().splitlines()]


def test_ppo_raises_a_programmatic_reward_with_finite_kl(setup, tmp_path):
    out = ppo.train(cfg(setup, tmp_path / "ppo", steps=24, rollout_batch_size=16, mini_batch_size=8))
    m = metrics(out)
    first, final = sum(x["score"] for x in m[:4]) / 4, sum(x["score"] for x in m[-4:]) / 4
    assert final > 2 * first + 1, [round(x["score"], 2) for x in m]
    assert all(torch.isfinite(torch.tensor(x["kl"])) for x in m) and m[-1]["kl"] > 0
    for key in ("reward", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "response_len",
                "tokens_per_s", "rollout_s", "optimise_s", "peak_mem_mb", "kl_coef"):
        assert key in m[-1]
    man = json.loads((out / "instruct.json").read_text())
    assert man["stage"] == "ppo" and man["merged"] == [str(setup[1].resolve())]
    assert (out / "adapter_model.safetensors").exists() and (out / "value_head.safetensors").exists()
    assert not (out / "reward").exists() and not (out / "value").exists()  # only the policy adapter


def lm_loss(run_dir, texts_path, tok_dir):
    source = sources.resolve(str(run_dir))
    model = models.inference_model(source, C.ModelConfig(), "cpu")
    tok = models.load_tokenizer(source)
    rows = [tokens.encode_text(tok, r.text)[:128] for r in data.load(str(texts_path), "pretraining").records[:24]]
    total, n = 0.0, 0
    with torch.no_grad():
        for ids in rows:
            s, c = rlhf.lm_loss_sum(model(input_ids=torch.tensor([ids])).logits, torch.tensor([ids]))
            total, n = total + s.item(), n + c
    return total / n


def test_ptx_keeps_the_lm_loss_lower_than_plain_ppo(setup, tmp_path):
    ptx_text = SAMPLES / "pretrain.jsonl"
    plain = ppo.train(cfg(setup, tmp_path / "plain", steps=8, seed=1))
    mixed = ppo.train(cfg(setup, tmp_path / "ptx", steps=8, seed=1, ptx_coef=1.0, ptx_data=str(ptx_text)))
    assert "ptx_loss" in metrics(mixed)[-1]
    assert lm_loss(mixed, ptx_text, None) < lm_loss(plain, ptx_text, None)


def test_micro_batches_accumulate_the_same_update_as_one_mini_batch(setup, tmp_path):
    """A mini-batch of 4 run as micro-batches of 1 (unequal lengths, so unequal token shares) takes the same
    optimizer step as one forward of 4: each micro-batch adds its share of the mini-batch's token mean."""
    ptx = dict(ptx_coef=1.0, ptx_data=str(SAMPLES / "pretrain.jsonl"))
    whole = ppo.train(cfg(setup, tmp_path / "whole", steps=2, micro_batch_size=4, **ptx))
    micro = ppo.train(cfg(setup, tmp_path / "micro", steps=2, micro_batch_size=1, **ptx))
    wa, wb = load_file(str(whole / "adapter_model.safetensors")), load_file(str(micro / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-5, rtol=1e-4), k
    for x, y in zip(metrics(whole), metrics(micro)):
        for k in ("policy_loss", "value_loss", "ptx_loss", "grad_norm", "value_grad_norm", "clipfrac", "approx_kl"):
            assert y[k] == pytest.approx(x[k], rel=1e-4, abs=1e-6), (k, x["step"])
    assert metrics(whole)[-1]["grad_norm"] > 0


def test_ptx_term_runs_through_the_policy_adapter(setup, tmp_path, monkeypatch):
    seen = []
    real = forward.labelled_logits

    def spy(model, *a, **kw):
        seen.append(model.active_adapter)
        return real(model, *a, **kw)

    monkeypatch.setattr(forward, "labelled_logits", spy)
    ppo.train(cfg(setup, tmp_path / "ptx", steps=1, ptx_coef=1.0, ptx_data=str(SAMPLES / "pretrain.jsonl")))
    assert seen and set(seen) == {ppo.POLICY}, seen


@pytest.mark.parametrize("ptx", [0.0, 1.0])
def test_resume_after_a_crash_matches_an_uninterrupted_run(setup, tmp_path, monkeypatch, ptx):
    """Also with PPO-ptx, whose reference forward (adapters off) last touched the adapters before the
    checkpoint: the checkpoint must still hold every trainable weight, the value adapter's included."""
    kw = dict(steps=4, save_every=2, ptx_coef=ptx, ptx_data=str(SAMPLES / "pretrain.jsonl") if ptx else "")
    a = ppo.train(cfg(setup, tmp_path / "a", **kw))
    original = checkpoint.RunDir.save_checkpoint

    def crash(self, step, *args, **kw):
        original(self, step, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        ppo.train(cfg(setup, tmp_path / "b", **kw))
    monkeypatch.setattr(checkpoint.RunDir, "save_checkpoint", original)
    saved = load_file(str(tmp_path / "b.partial" / "checkpoints" / "step-2" / "trainable.safetensors"))
    assert any(f".{models.VALUE}." in k for k in saved) and any(f".{models.POLICY}." in k for k in saved)
    b = ppo.train(cfg(setup, tmp_path / "b", resume=True, **kw))
    ma, mb = metrics(a), metrics(b)
    assert [x["step"] for x in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        for k in ("score", "kl", "policy_loss", "value_loss", "ptx_loss"):
            assert y[k] == pytest.approx(x[k], abs=1e-4), (k, x["step"])


def test_8bit_base_takes_ppo_steps_on_cpu(setup, tmp_path):
    out = ppo.train(cfg(setup, tmp_path / "q8", steps=2, stop_kl=1e6,  # the budget's KL from the recompute
                        model=C.ModelConfig(quant="8bit", lora_targets=LORA)))
    m = metrics(out)
    assert len(m) == 2 and all(torch.isfinite(torch.tensor([x["policy_loss"], x["value_loss"]])).all() for x in m)
    assert all(x["kl_stop"] >= 0 for x in m) and m[-1]["kl_stop"] > 0


def test_one_copy_of_the_base_weights(setup, tiny_dir):
    from transformers import AutoModelForCausalLM

    m, _ = models.ppo_models(sources.resolve(str(setup[1])), setup[3], C.ModelConfig(lora_targets=LORA), "cpu")
    base = AutoModelForCausalLM.from_pretrained(tiny_dir)
    storages = {}
    for n, p in m.named_parameters(remove_duplicate=False):
        if "lora_" not in n and "value_head" not in n and "score" not in n:
            storages[p.untyped_storage().data_ptr()] = p.numel()
    assert sum(storages.values()) == sum(p.numel() for p in base.parameters())
    # policy and value adapters are separate, the reference is the same base with adapters off
    assert any(".default." in n for n, _ in m.lm.named_parameters()) and any(".value." in n for n, _ in
                                                                             m.lm.named_parameters())


def test_reward_model_path_value_initialised_from_rm(setup, tiny_dir, tmp_path, cli):
    from instructcli import rm

    d, sft_dir, prompts, _ = setup
    cmp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"Q{i}?", "chosen": "yes yes", "rejected": "no"}
                                             for i in range(8)])
    rm_cfg = dict(data=str(cmp), quiet=True, train=C.TrainConfig(max_steps=2, batch_size=4, eval_frac=0))
    rm_dir = rm.train(C.RMConfig(out=str(tmp_path / "rm"), model=C.ModelConfig(model=str(sft_dir)), **rm_cfg))
    m, rm_source = models.ppo_models(sources.resolve(str(sft_dir)), str(rm_dir), C.ModelConfig(), "cpu")
    assert torch.allclose(m.value_head.weight, m.reward.head.weight * m.reward.scale) and m.reward.bias != 0.0
    # PPO's scores are (raw - bias) x scale: the value head starts on that scale
    assert m.reward.scale > 0 and m.reward.scale != 1.0
    h = torch.randn(3, m.value_head.in_features)
    want = (m.reward.head(h).squeeze(-1) - m.reward.bias) * m.reward.scale
    assert torch.allclose(m.value_head(h).squeeze(-1), want, atol=1e-5)
    policy, value = m.param_groups()
    assert policy and all(p.requires_grad for p in policy) and any(p is m.value_head.weight for p in value)
    assert {id(p) for p in policy}.isdisjoint(id(p) for p in value)
    assert len(policy) + len(value) == len([p for p in m.parameters() if p.requires_grad])
    params = dict(m.lm.named_parameters())
    value = {n: p for n, p in params.items() if ".value." in n}
    assert value and all(torch.equal(p, params[n.replace(".value.", ".reward.")]) for n, p in value.items())
    assert all(p.requires_grad for p in value.values()) and m.value_head.weight.requires_grad
    assert not any(p.requires_grad for n, p in params.items() if ".reward." in n)
    out = ppo.train(cfg(setup, tmp_path / "ppo", reward=str(rm_dir), steps=2, model=C.ModelConfig()))
    man = json.loads((out / "instruct.json").read_text())
    assert [p["stage"] for p in man["parents"]] == ["sft", "rm"]
    # sample accepts the ppo dir like an sft dir
    r = cli("sample", out, "-p", prompts, "--max-new-tokens", 4, "-q")
    assert r.code == 0 and len(r.out.splitlines()) == 8
    # an RM trained on another base cannot share the policy's base
    other = rm.train(C.RMConfig(out=str(tmp_path / "rm2"), model=C.ModelConfig(model=str(tiny_dir)), **rm_cfg))
    r = cli("ppo", "--policy", sft_dir, "--reward", other, "-p", prompts, "-o", tmp_path / "x", "--ptx-coef", 0)
    assert r.code == 2 and "trained on another base" in r.err and not (tmp_path / "x.partial").exists()
    r = cli("ppo", "--policy", sft_dir, "--reward", sft_dir, "-p", prompts, "-o", tmp_path / "x", "--ptx-coef", 0)
    assert r.code == 2 and "not a reward model run dir (it is sft)" in r.err
    r = cli("ppo", "--policy", sft_dir, "--reward", rm_dir, "-p", prompts, "-o", tmp_path / "x")
    assert r.code == 2 and "--ptx-coef > 0 needs --ptx-data" in r.err


def test_old_logprobs_from_the_sampling_loop_match_a_recompute(setup, tmp_path, monkeypatch):
    """--old-logprobs rollout (the sampling loop's) and recompute (a policy forward) on a float32 base: the same
    samples, so the same scores, KL and entropy, step after step; auto picks rollout here. The budget's KL
    (--stop-kl, never reached here) comes from the sampling loop's logits with rollout, with no policy forward
    outside the update, and from the recompute's forward with recompute: the same figure either way."""
    seen = []  # (mode, whether a policy forward ran without gradient, i.e. outside the update)
    forward_logits = ppo.response_logits

    def spy(*a, reference=False, **kw):
        seen.append((mode, not reference and not torch.is_grad_enabled()))
        return forward_logits(*a, reference=reference, **kw)

    monkeypatch.setattr(ppo, "response_logits", spy)
    runs = {}
    for mode in ("rollout", "recompute", "auto"):
        runs[mode] = metrics(ppo.train(cfg(setup, tmp_path / mode, steps=3, old_logprobs=mode, stop_kl=1e6)))
    assert not any(nograd for m, nograd in seen if m != "recompute") and any(nograd for _, nograd in seen)
    # logits over ppo.KEEP_LOGITS_BYTES are not kept: the budget's KL then comes from a policy forward, the same
    seen.clear()
    monkeypatch.setattr(ppo, "KEEP_LOGITS_BYTES", 0)
    mode = "big"
    big = metrics(ppo.train(cfg(setup, tmp_path / mode, steps=3, old_logprobs="rollout", stop_kl=1e6)))
    assert any(nograd for _, nograd in seen)
    assert [x["kl_stop"] for x in big] == pytest.approx([x["kl_stop"] for x in runs["rollout"]], abs=1e-4)
    for a, b, c in zip(runs["rollout"], runs["recompute"], runs["auto"]):
        assert a["response_len"] == b["response_len"] and a["score"] == b["score"]
        for k in ("kl", "entropy", "reward", "policy_loss", "kl_stop"):
            assert a[k] == pytest.approx(b[k], abs=1e-4), k
        assert a["kl"] == c["kl"] and a["policy_loss"] == c["policy_loss"]
    assert runs["rollout"][0]["kl"] == pytest.approx(0, abs=1e-5) and runs["rollout"][-1]["kl"] != 0
    assert runs["rollout"][0]["kl_stop"] == pytest.approx(0, abs=1e-5) and runs["rollout"][-1]["kl_stop"] > 0


def test_length_chunks():
    assert batches.length_chunks([5, 1, 4, 1, 9], 2) == [[1, 3], [2, 0], [4]]
    assert batches.length_chunks([], 3) == []


def test_top_p_zero_and_temperature_zero_are_refused(setup, tmp_path, cli):
    d, sft_dir, prompts, rule = setup
    for flags in (["--top-p", 0], ["--temperature", 0], ["--top-p", 1.5]):
        r = cli("ppo", "--policy", sft_dir, "--reward", rule, "-p", prompts, "-o", tmp_path / "x", "--ptx-coef", 0,
                *flags)
        assert r.code == 2 and "--top-p in (0, 1]" in r.err and not (tmp_path / "x.partial").exists(), r
    with pytest.raises(Exception, match="top-p"):  # a config built in Python too
        ppo.train(cfg(setup, tmp_path / "y", top_p=0.0))


def test_ppo_optimizer_has_no_weight_decay_and_clips_policy_and_value_apart(setup, tmp_path, monkeypatch):
    seen = {}
    real = torch.optim.AdamW

    def adamw(params, **kw):
        seen.update(kw)
        return real(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    out = ppo.train(cfg(setup, tmp_path / "ppo", steps=1))
    assert seen["weight_decay"] == 0.0
    last = metrics(out)[-1]
    assert last["grad_norm"] > 0 and last["value_grad_norm"] > 0


def test_ppo_scores_the_tokens_as_sampled_so_a_cut_off_answer_has_no_end_of_turn(setup, tmp_path, monkeypatch):
    """The RM reads an answer cut off at --max-new-tokens without the end-of-turn token the chat template would
    add on re-rendering (finding: truncated answers used to look finished to the RM)."""
    from instructcli import rm

    d, sft_dir, prompts, _ = setup
    cmp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"Q{i}?", "chosen": "yes yes", "rejected": "no"}
                                             for i in range(4)])
    rm_dir = rm.train(C.RMConfig(data=str(cmp), out=str(tmp_path / "rm"), quiet=True,
                                 model=C.ModelConfig(model=str(sft_dir)),
                                 train=C.TrainConfig(max_steps=1, batch_size=4, eval_frac=0)))
    scored = []
    real = ppo.rm_scores_and_values

    def spy(nets, ro, pad_id, chunk):  # the reward forward reads each rollout's prompt + response as collated
        ids, attn, _, _ = batches.collate_rollout(ro.queries, ro.responses, pad_id)
        scored.extend(x[m.bool()].tolist() for x, m in zip(ids, attn))
        return real(nets, ro, pad_id, chunk)

    monkeypatch.setattr(ppo, "rm_scores_and_values", spy)
    ppo.train(cfg(setup, tmp_path / "ppo", reward=str(rm_dir), steps=1, max_new_tokens=3, model=C.ModelConfig()))
    tok = models.load_tokenizer(sources.resolve(str(sft_dir)))
    eot = tokens.end_of_turn_id(tok)
    queries, _ = tokens.encode_prompts(tok, data.load(str(prompts), "prompts"), 256)
    assert len(scored) == 8 and eot is not None
    for ids in scored:  # the prompt, then at most 3 sampled tokens; an eot only as the answer's own last token
        q = next(q for q in queries if ids[:len(q)] == q)
        answer = ids[len(q):]
        assert 1 <= len(answer) <= 3 and eot not in answer[:-1]
    assert any(ids[-1] != eot for ids in scored), "with 3 new tokens, some answers are cut off"


@pytest.mark.parametrize("layer", [0, 1])
def test_mean_pooled_rm_and_its_value_head_agree_at_the_start(setup, tmp_path, layer):
    """With --pool mean the score head reads the end-of-turn state and the response's mean (with --score-layer,
    after the first layers only); the value head, copied from it, reads the same features of each prefix, so
    at PPO's start the value at an answer's last token is the RM's (normalised) score of that answer."""
    from instructcli import rm

    d, sft_dir, prompts, _ = setup
    cmp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"Q{i}?", "responses": ["yes yes", "no", "maybe so"],
                                              "ranks": [1, 3, 2]} for i in range(8)])
    rm_dir = rm.train(C.RMConfig(data=str(cmp), out=str(tmp_path / "rm"), quiet=True, pool="mean", head_lr=1e-2,
                                 score_depth=0.5 if layer else 1.0,
                                 model=C.ModelConfig(model=str(sft_dir)),
                                 train=C.TrainConfig(max_steps=3, batch_size=4, eval_frac=0)))
    assert json.loads((rm_dir / "instruct.json").read_text())["config"]["pool"] == "mean"
    m, _ = models.ppo_models(sources.resolve(str(sft_dir)), str(rm_dir), C.ModelConfig(), "cpu")
    m.eval()  # as ppo runs it: the RM's adapter was trained with dropout
    assert m.reward.layers == m.layers == layer
    if layer:  # the reward adapter lives only where the head reads: the first layer
        assert {n.split(".layers.")[1].split(".")[0] for n, _ in m.lm.named_parameters() if ".reward." in n} == {"0"}
    assert m.reward.head.in_features == m.value_head.in_features == 2 * m.lm.config.hidden_size
    tok = models.load_tokenizer(sources.resolve(str(sft_dir)))
    q = tokens.encode_prompt(tok, [{"role": "user", "content": "Q1?"}])
    ids = torch.tensor([q + tok.encode("yes yes", add_special_tokens=False) + [tok.eos_token_id]])
    mask, starts = torch.ones_like(ids), torch.tensor([len(q)])
    with torch.no_grad():
        m.use(models.REWARD)
        score = m.reward.score(ids, mask, starts)
        m.use(models.VALUE)
        h = forward.hidden_states(m.lm, ids, mask, layers=layer).float()
        values = m.value_head(forward.score_features(h, mask, starts, "mean")).squeeze(-1)
        full = forward.hidden_states(m.lm, ids, mask).float()
    assert values[0, -1].item() == pytest.approx(score.item(), abs=1e-4)
    assert len(m.lm.get_base_model().get_decoder().layers) == 2  # the shared base is whole again
    assert layer == 0 or not torch.allclose(h, full)  # read after the first layer, not the last
    out = ppo.train(cfg(setup, tmp_path / "ppo", reward=str(rm_dir), steps=1, model=C.ModelConfig()))
    assert metrics(out)[-1]["value_loss"] >= 0


def test_scores_and_values_from_one_mixed_adapter_forward_equal_the_two_apart(setup, tmp_path):
    """ppo's scoring phase runs reward and value as one batch through two adapters; each must get exactly what
    its own forward gives (the value adapter made to differ from the reward one it was copied from, so a row
    through the wrong adapter shows)."""
    from instructcli import rm

    d, sft_dir, prompts, _ = setup
    cmp = write_jsonl(tmp_path / "c.jsonl", [{"prompt": f"Q{i}?", "responses": ["yes yes", "no", "maybe so"],
                                              "ranks": [1, 3, 2]} for i in range(8)])
    rm_dir = rm.train(C.RMConfig(data=str(cmp), out=str(tmp_path / "rm"), quiet=True, pool="mean", head_lr=1e-2,
                                 model=C.ModelConfig(model=str(sft_dir)),
                                 train=C.TrainConfig(max_steps=3, batch_size=4, eval_frac=0)))
    m, _ = models.ppo_models(sources.resolve(str(sft_dir)), str(rm_dir), C.ModelConfig(), "cpu")
    m.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m.lm.named_parameters():
            if f".{models.VALUE}." in n and "lora_B" in n:
                p.normal_(0, 0.5)
    tok = models.load_tokenizer(sources.resolve(str(sft_dir)))
    queries = [tokens.encode_prompt(tok, [{"role": "user", "content": q}]) for q in ("Hi?", "Tell me a long one?",
                                                                                     "Q?", "Why not?", "x")]
    responses = [tok.encode(r, add_special_tokens=False) for r in ("yes yes", "no", "", "maybe so then", "a")]
    responses[1].append(tok.eos_token_id)  # one ended answer among cut-off ones
    ro = ppo.new_rollout(queries, responses, tok.pad_token_id, "cpu")
    with torch.no_grad():
        scores, values = ppo.rm_scores_and_values(m, ro, tok.pad_token_id, 2)
        m.use(models.REWARD)
        apart = torch.stack([m.reward.score(torch.tensor([q + r]), torch.ones(1, len(q + r), dtype=torch.long),
                                            torch.tensor([len(q)]))[0] for q, r in zip(queries, responses)])
        m.use(models.VALUE)
        values_apart = ppo.over_rollout(ro, 2, lambda rows: (ppo.response_values(m, ro, rows, tok.pad_token_id,
                                                                                 "cpu"),))[0]
    assert torch.allclose(scores, apart, atol=1e-5), (scores, apart)
    assert torch.allclose(values * ro.mask, values_apart * ro.mask, atol=1e-5)
    assert not torch.allclose(values[:, -1], scores)  # the value adapter does differ from the reward one


@pytest.mark.parametrize("schedule,epochs,want", [
    ("constant", 1, [1.0] * 4),
    ("linear", 1, [1.0, 0.75, 0.5, 0.25]),  # 2 steps x 2 mini-batches: 4 updates, decayed to 0 after the last
    ("linear", 2, [1 - i / 8 for i in range(8)]),  # each PPO epoch is its own update
])
def test_ppo_schedule_decays_the_rate_over_every_optimizer_update(setup, tmp_path, monkeypatch, schedule, epochs, want):
    seen = []
    real = loop.optimizer_step

    def step(guard, n, loss, norm, optimizer, scheduler):
        seen.append(optimizer.param_groups[0]["lr"])
        return real(guard, n, loss, norm, optimizer, scheduler)

    monkeypatch.setattr(loop, "optimizer_step", step)
    ppo.train(cfg(setup, tmp_path / "ppo", steps=2, schedule=schedule, ppo_epochs=epochs))
    assert seen == pytest.approx([1e-2 * w for w in want])


def test_stop_kl_ends_the_run_before_the_update_of_the_step_whose_kl_averages_the_budget(setup, tmp_path):
    out = ppo.train(cfg(setup, tmp_path / "ppo", steps=24, rollout_batch_size=16, mini_batch_size=8, stop_kl=0.3))
    m = metrics(out)
    kls = [x["kl_stop"] for x in m]  # the KL at --stop-kl-temperature (0.7), from the full distributions
    assert 3 <= len(kls) < 24, kls  # it stopped early, at the first step whose 3-step mean reached the budget
    assert sum(kls[-3:]) / 3 >= 0.3 and all(sum(kls[i - 3:i]) / 3 < 0.3 for i in range(3, len(kls)))
    assert all(k >= 0 for k in kls)
    assert "policy_loss" not in m[-1] and all("policy_loss" in x for x in m[:-1])  # that step made no update
    man = json.loads((out / "instruct.json").read_text())
    assert man["metrics"]["step"] == len(kls) and man["metrics"]["stopped_at_kl_budget"] is True
    # the policy saved is the one that drew the last rollouts: that of a run of one step fewer, unbudgeted
    ref = ppo.train(cfg(setup, tmp_path / "short", steps=len(kls) - 1, rollout_batch_size=16, mini_batch_size=8))
    a, b = load_file(str(out / "adapter_model.safetensors")), load_file(str(ref / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stop_kl_reads_a_kl_that_grows_as_the_temperature_falls(setup, tmp_path):
    # the same run (the budget never reached), its KL read at T 1.0 and at T 0.5: the sharper distributions
    # differ more, every step past the first
    kw = dict(steps=6, rollout_batch_size=16, mini_batch_size=8, stop_kl=1e6)
    hot = metrics(ppo.train(cfg(setup, tmp_path / "t1", stop_kl_temperature=1.0, **kw)))
    cold = metrics(ppo.train(cfg(setup, tmp_path / "t05", stop_kl_temperature=0.5, **kw)))
    assert [x["score"] for x in hot] == [x["score"] for x in cold]  # the measure does not change the run
    assert all(c["kl_stop"] > h["kl_stop"] > 0 for h, c in zip(hot[1:], cold[1:])), (hot, cold)
