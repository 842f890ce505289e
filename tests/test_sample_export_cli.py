"""sample, export, env and the CLI surface: formats, determinism, pipes, exit codes, config files."""

import json
import os
import subprocess
import sys

import pytest

from conftest import write_jsonl

PROMPTS = [{"prompt": "Say hello."}, {"id": "q2", "prompt": "Two plus two?"},
           {"messages": [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Capital?"}]}]


@pytest.fixture(scope="module")
def sft_dir(tiny_dir, tmp_path_factory):
    from instructcli import config as C, sft

    d = tmp_path_factory.mktemp("sftrun")
    demos = write_jsonl(d / "demos.jsonl", [{"prompt": "Say hello.", "response": "Hello!"}] * 4)
    return sft.train(C.SFTConfig(data=str(demos), out=str(d / "sft"), quiet=True,
                                 model=C.ModelConfig(model=str(tiny_dir)),
                                 train=C.TrainConfig(max_steps=2, batch_size=2, eval_frac=0)))


def rows(text):
    return [json.loads(l) for l in text.splitlines() if l.strip()]


def test_sample_format_and_determinism(cli, sft_dir, tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", PROMPTS)
    args = ["sample", sft_dir, "-p", p, "-n", 3, "--max-new-tokens", 6, "--temperature", 1.0, "--seed", 7, "-q"]
    a = cli(*args, "-o", "-")
    assert a.code == 0, a
    got = rows(a.out)
    assert [r["id"] for r in got] == ["1", "q2", "3"]
    assert [r["prompt"] for r in got] == ["Say hello.", "Two plus two?", "Capital?"]
    assert all(len(r["responses"]) == 3 and r["model"] == str(sft_dir) for r in got)
    assert got[2]["messages"][0]["role"] == "system" and "messages" not in got[0]
    assert len({tuple(r["responses"]) for r in got}) > 1  # temperature 1 on a random model: varied output
    out = tmp_path / "s.jsonl"
    assert cli(*args, "-o", out).code == 0
    assert rows(out.read_text()) == got  # same seed, same samples
    c = cli(*args[:-3], "--seed", 8, "-q", "-o", "-")
    assert rows(c.out) != got


def test_sample_reads_stdin_and_base_model_dir(cli, tiny_dir):
    stdin = "".join(json.dumps(p) + "\n" for p in PROMPTS[:2]).encode()
    r = cli("sample", tiny_dir, "--max-new-tokens", 4, "--temperature", 0, "-b", 1, "-q", stdin=stdin)
    assert r.code == 0, r
    got = rows(r.out)
    assert len(got) == 2 and got[0]["model"] == str(tiny_dir)
    # greedy is batch-size independent (left padding keeps every row's next token in the last column)
    r2 = cli("sample", tiny_dir, "--max-new-tokens", 4, "--temperature", 0, "-b", 2, "-q", stdin=stdin)
    assert rows(r2.out) == got


def test_sample_bad_prompts_exit_2_and_no_output(cli, tiny_dir, tmp_path):
    p = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "ok"}, {"messages": [{"role": "assistant", "content": "x"}]}])
    out = tmp_path / "o.jsonl"
    r = cli("sample", tiny_dir, "-p", p, "-o", out)
    assert r.code == 2 and "p.jsonl:2: messages[0].role" in r.err and not out.exists()


def test_export_loads_without_peft(cli, sft_dir, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    r = cli("export", sft_dir, out)
    assert r.code == 0 and r.out.strip() == str(out)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    man = json.loads((sft_dir / "instruct.json").read_text())
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(man["base_model"]["source"]), sft_dir)
    x = torch.tensor([[1, 5, 9, 20]])
    assert torch.allclose(merged(x).logits, ref(x).logits, atol=1e-5)
    assert cli("export", sft_dir, out).code == 2  # refuses to overwrite


def test_help_lists_every_command():
    r = subprocess.run([sys.executable, "-m", "instructcli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0
    for cmd in ("sft", "sample", "export", "env"):
        assert f"  {cmd} " in r.stdout


def test_bad_input_in_a_subprocess_is_one_line_no_traceback(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-m", "instructcli", "sft", str(tmp_path / "missing.jsonl"), "-o",
                        str(tmp_path / "o")], capture_output=True, text=True, env=env)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: {tmp_path / 'missing.jsonl'}: no such file"
    r = subprocess.run([sys.executable, "-m", "instructcli", "sft", "x.jsonl", "--quant", "3bit"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--quant: expected one of none | 8bit | 4bit" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "instructcli", "ppo", "--policy", "x", "--reward", "y", "-p", "z",
                        "--old-logprobs", "bogus"], capture_output=True, text=True, env=env)
    assert r.returncode == 2 and r.stderr.strip() == (
        "error: --old-logprobs: expected one of auto | rollout | recompute, got 'bogus'")


def test_config_file_sets_defaults_and_flags_override(cli, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('seed = 3\n[sft]\nlr = 0.001\nbatch-size = 2\nquant = "8bit"\n')
    r = cli("sft", "d.jsonl", "--config", cfg, "--lr", 0.5, "--print-config")
    assert r.code == 0, r
    assert "lr = 0.5" in r.out and "batch-size = 2" in r.out and 'quant = "8bit"' in r.out and "seed = 3" in r.out
    saved = tmp_path / "resolved.toml"
    saved.write_text(r.out)
    again = cli("sft", "d.jsonl", "--config", saved, "--print-config")
    assert again.out == r.out  # --print-config output is itself a valid --config
    cfg.write_text("[sft]\nlearning_rate = 1\n")
    r = cli("sft", "d.jsonl", "--config", cfg)
    assert r.code == 2 and "learning_rate: not an option of `instruct sft`" in r.err


def test_env_reports_quantization(cli):
    r = cli("env")
    info = json.loads(r.out)
    assert r.code == 0 and info["device"] in ("cpu", "cuda")
    assert info["quant_8bit"] == "ok" and info["quant_4bit"] == "ok"
    assert info["versions"]["instruct"]
