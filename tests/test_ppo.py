"""ppo on the tiny model: reward goes up with a programmatic reward, ptx keeps the LM loss down, resume is
exact, the 8-bit path runs, and only one copy of the base weights exists."""

import json

import pytest
import torch

from conftest import SAMPLES, write_jsonl
from instructcli import config as C, data, models, ppo, rlhf, sft

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
                steps=4, rollout_batch_size=8, mini_batch_size=4, max_new_tokens=12, lr=1e-2, save_every=0,
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
    source = models.resolve(str(run_dir))
    model = models.inference_model(source, C.ModelConfig(), "cpu")
    tok = models.load_tokenizer(source)
    rows = [data.encode_text(tok, r.text)[:128] for r in data.load(str(texts_path), "pretraining").records[:24]]
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


def test_resume_after_a_crash_matches_an_uninterrupted_run(setup, tmp_path, monkeypatch):
    a = ppo.train(cfg(setup, tmp_path / "a", steps=4, save_every=2))
    original = models.RunDir.save_checkpoint

    def crash(self, step, *args, **kw):
        original(self, step, *args, **kw)
        raise KeyboardInterrupt

    monkeypatch.setattr(models.RunDir, "save_checkpoint", crash)
    with pytest.raises(KeyboardInterrupt):
        ppo.train(cfg(setup, tmp_path / "b", steps=4, save_every=2))
    monkeypatch.setattr(models.RunDir, "save_checkpoint", original)
    b = ppo.train(cfg(setup, tmp_path / "b", steps=4, save_every=2, resume=True))
    ma, mb = metrics(a), metrics(b)
    assert [x["step"] for x in mb] == [1, 2, 3, 4]
    for x, y in zip(ma, mb):
        for k in ("score", "kl", "policy_loss", "value_loss"):
            assert y[k] == pytest.approx(x[k], abs=1e-4), (k, x["step"])


def test_8bit_base_takes_ppo_steps_on_cpu(setup, tmp_path):
    out = ppo.train(cfg(setup, tmp_path / "q8", steps=2, model=C.ModelConfig(quant="8bit", lora_targets=LORA)))
    m = metrics(out)
    assert len(m) == 2 and all(torch.isfinite(torch.tensor([x["policy_loss"], x["value_loss"]])).all() for x in m)


def test_one_copy_of_the_base_weights(setup, tiny_dir):
    from transformers import AutoModelForCausalLM

    m, _ = models.ppo_models(models.resolve(str(setup[1])), setup[3], C.ModelConfig(lora_targets=LORA), "cpu")
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
    m, rm_source = models.ppo_models(models.resolve(str(sft_dir)), str(rm_dir), C.ModelConfig(), "cpu")
    assert torch.equal(m.value_head.weight, m.reward.head.weight) and m.reward.bias != 0.0
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


def test_old_logprobs_from_the_sampling_loop_match_a_recompute(setup, tmp_path):
    """--old-logprobs rollout (the sampling loop's) and recompute (a policy forward) on a float32 base: the same
    samples, so the same scores, KL and entropy, step after step; auto picks rollout here."""
    runs = {mode: metrics(ppo.train(cfg(setup, tmp_path / mode, steps=3, old_logprobs=mode)))
            for mode in ("rollout", "recompute", "auto")}
    for a, b, c in zip(runs["rollout"], runs["recompute"], runs["auto"]):
        assert a["response_len"] == b["response_len"] and a["score"] == b["score"]
        for k in ("kl", "entropy", "reward", "policy_loss"):
            assert a[k] == pytest.approx(b[k], abs=1e-4), k
        assert a["kl"] == c["kl"] and a["policy_loss"] == c["policy_loss"]
    assert runs["rollout"][0]["kl"] == pytest.approx(0, abs=1e-5) and runs["rollout"][-1]["kl"] != 0


def test_length_chunks():
    assert data.length_chunks([5, 1, 4, 1, 9], 2) == [[1, 3], [2, 0], [4]]
    assert data.length_chunks([], 3) == []
