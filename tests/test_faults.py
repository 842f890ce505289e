"""Faults injected for real inside the training loops: out-of-memory errors, NaN/inf in losses, gradients,
rewards and advantages. Each must be skipped or reported in one line, and never reach a saved checkpoint."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl
from instructcli import config as C, forward, generate, models, ppo, rlhf, rm, sft
from instructcli.errors import InstructError


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults")
    demos = write_jsonl(d / "demos.jsonl", [{"prompt": f"Say {w}.", "response": f"{w} {w}!"} for w in "abcdefgh"])
    cmp = write_jsonl(d / "cmp.jsonl", [{"prompt": f"Q{i}?", "responses": ["yes yes", "yes", "no"],
                                         "ranks": [1, 2, 3]} for i in range(8)])
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in "abcd"])
    return d, demos, cmp, prompts


def sft_cfg(tiny_dir, demos, out, **train):
    t = dict(max_steps=4, batch_size=4, eval_frac=0, save_every=0, lr=1e-2)
    t.update(train)
    return C.SFTConfig(data=str(demos), out=str(out), quiet=True, model=C.ModelConfig(model=str(tiny_dir)),
                       train=C.TrainConfig(**t))


def losses(run_dir):
    return [json.loads(x)["loss"] for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def oom_above(fn, limit, size_of):
    """Wrap fn so it raises CUDA's out-of-memory error whenever its batch is larger than `limit`."""
    def wrapped(*a, **kw):
        if size_of(*a, **kw) > limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return fn(*a, **kw)
    return wrapped


# -------------------------------------------------------------------------------------------- out of memory
def test_sft_auto_batch_size_halves_until_it_fits_with_the_same_update(tiny_dir, files, tmp_path, monkeypatch):
    _, demos, _, _ = files
    want = losses(sft.train(sft_cfg(tiny_dir, demos, tmp_path / "ref", batch_size=1, grad_accum=4)))
    monkeypatch.setattr(forward, "lm_loss_sum", oom_above(forward.lm_loss_sum, 1, lambda m, ids, *a: ids.shape[0]))
    got = losses(sft.train(sft_cfg(tiny_dir, demos, tmp_path / "auto", batch_size=4, auto_batch_size=True)))
    assert got == pytest.approx(want, abs=1e-5)


def test_sft_out_of_memory_without_auto_names_the_batch_and_what_to_try(cli, tiny_dir, files, tmp_path,
                                                                         monkeypatch):
    _, demos, _, _ = files
    monkeypatch.setattr(forward, "lm_loss_sum", oom_above(forward.lm_loss_sum, 2, lambda m, ids, *a: ids.shape[0]))
    r = cli("sft", demos, "-m", tiny_dir, "-o", tmp_path / "o", "-b", 4, "--max-steps", 2, "--eval-frac", 0, "-q")
    assert r.code == 1, r
    assert "out of memory at step 1 with micro-batches of 4 (--batch-size): try --batch-size 2 --grad-accum 2" \
        in r.err and "--auto-batch-size" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "o").exists()


def test_rm_auto_batch_size_keeps_the_loss(tiny_dir, files, tmp_path, monkeypatch):
    _, _, cmp, _ = files

    def cfg(out, **t):
        return C.RMConfig(data=str(cmp), out=str(out), quiet=True, model=C.ModelConfig(model=str(tiny_dir)),
                          train=C.TrainConfig(max_steps=2, eval_frac=0, save_every=0, **t))

    want = losses(rm.train(cfg(tmp_path / "ref", batch_size=2, grad_accum=2)))
    monkeypatch.setattr(rlhf, "ranking_loss", oom_above(rlhf.ranking_loss, 2, lambda rewards, ranks: rewards.shape[0]))
    got = losses(rm.train(cfg(tmp_path / "auto", batch_size=4, auto_batch_size=True)))
    assert got == pytest.approx(want, abs=1e-5)


def test_ppo_out_of_memory_names_its_sizes(cli, tiny_dir, files, tmp_path, monkeypatch):
    d, demos, _, prompts = files
    s = sft.train(sft_cfg(tiny_dir, demos, tmp_path / "sft", max_steps=1))
    rule = tmp_path / "rule.py"
    rule.write_text("def f(prompt, response):\n    return 1.0\n")
    monkeypatch.setattr(generate, "generate", oom_above(generate.generate, 0, lambda *a, **k: 1))
    r = cli("ppo", "--policy", s, "--reward", f"{rule}:f", "-p", prompts, "--ptx-coef", 0, "--steps", 1,
            "--rollout-batch-size", 4, "--mini-batch-size", 2, "-o", tmp_path / "ppo", "-q")
    assert r.code == 1, r
    assert "out of memory at step 1 with --rollout-batch-size 4, --mini-batch-size 2, --micro-batch-size 2" in r.err
    assert not (tmp_path / "ppo").exists()


# ---------------------------------------------------------------------------------------------- NaN / inf
def nan_on_calls(fn, calls: set[int]):
    """Wrap a loss function so its result is NaN on the given call numbers (1-based)."""
    n = {"i": 0}

    def wrapped(*a, **kw):
        n["i"] += 1
        out = fn(*a, **kw)
        if n["i"] in calls:
            return (out[0] * float("nan"), *out[1:]) if isinstance(out, tuple) else out * float("nan")
        return out
    return wrapped


def finite_weights(run_dir) -> bool:
    w = load_file(str(Path(run_dir) / "adapter_model.safetensors"))
    return all(torch.isfinite(v).all() for v in w.values())


def test_a_nan_loss_step_is_skipped_and_never_saved(tiny_dir, files, tmp_path, monkeypatch, capsys):
    _, demos, _, _ = files
    monkeypatch.setattr(forward, "lm_loss_sum", nan_on_calls(forward.lm_loss_sum, {2}))
    out = sft.train(sft_cfg(tiny_dir, demos, tmp_path / "o", save_every=1))
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3, 4] and all(math.isfinite(x) for x in losses(out))
    assert "step 2: non-finite loss or gradient" in capsys.readouterr().err
    assert finite_weights(out)


def test_nan_gradients_are_skipped_and_repeated_ones_abort(tiny_dir, files, tmp_path, monkeypatch):
    _, demos, _, _ = files
    real = models.trainable_model
    state = {"steps": set()}

    def poisoned(*a, **kw):  # a NaN gradient on one LoRA weight, on chosen backward passes
        model = real(*a, **kw)
        p = next(p for n, p in model.named_parameters() if p.requires_grad and "lora_A" in n)
        calls = {"i": 0}

        def hook(g):
            calls["i"] += 1
            return g * float("nan") if calls["i"] in state["steps"] else g
        p.register_hook(hook)
        return model

    monkeypatch.setattr(models, "trainable_model", poisoned)
    state["steps"] = {1}
    out = sft.train(sft_cfg(tiny_dir, demos, tmp_path / "one"))
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == [2, 3, 4]
    assert finite_weights(out)
    state["steps"] = set(range(1, 100))
    with pytest.raises(InstructError, match="5 non-finite steps in a row"):
        sft.train(sft_cfg(tiny_dir, demos, tmp_path / "all", max_steps=8, save_every=1))
    assert not (tmp_path / "all").exists()
    ckpts = list((tmp_path / "all.partial").glob("checkpoints/step-*"))
    assert ckpts == []  # no step succeeded, so nothing was saved


def test_ppo_skips_nan_rewards_and_advantages(tiny_dir, files, tmp_path, monkeypatch, capsys):
    d, demos, _, prompts = files
    s = sft.train(sft_cfg(tiny_dir, demos, tmp_path / "sft", max_steps=1))
    rule = tmp_path / "rule.py"
    rule.write_text("calls = [0]\n\ndef f(prompt, response):\n    calls[0] += 1\n"
                    "    return float('nan') if 5 <= calls[0] <= 8 else float(len(response))\n")

    def cfg(out, reward, steps=3):
        return C.PPOConfig(policy=str(s), reward=reward, prompts=str(prompts), out=str(out), quiet=True,
                           ptx_coef=0.0, steps=steps, rollout_batch_size=4, mini_batch_size=4, max_new_tokens=6,
                           save_every=1, model=C.ModelConfig(lora_targets="q_proj,v_proj"))

    out = ppo.train(cfg(tmp_path / "r", f"{rule}:f"))  # rollout 2 (calls 5..8) scores NaN
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 3] and "step 2: non-finite" in capsys.readouterr().err
    assert finite_weights(out)

    monkeypatch.setattr(rlhf, "gae", nan_on_calls(rlhf.gae, set(range(1, 100))))
    with pytest.raises(InstructError, match="non-finite steps in a row"):
        ppo.train(cfg(tmp_path / "a", f"{rule}:f", steps=8))
    assert not (tmp_path / "a").exists() and not list((tmp_path / "a.partial").glob("checkpoints/step-*"))


def test_eval_out_of_memory_names_its_sizes(cli, tiny_dir, files, tmp_path, monkeypatch):
    _, _, _, prompts = files
    monkeypatch.setattr(generate, "generate", oom_above(generate.generate, 0, lambda *a, **k: 1))
    r = cli("eval", tiny_dir, "-p", prompts, "-o", tmp_path / "ev", "-b", 2, "--max-new-tokens", 5, "-q")
    assert r.code == 1, r
    assert "out of memory with --batch-size 2, -n 1, --max-new-tokens 5" in r.err and "Traceback" not in r.err
    assert not (tmp_path / "ev").exists()
