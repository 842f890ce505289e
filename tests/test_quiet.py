"""Quiet output: each command once, as a user runs it (a subprocess through the real entry point, so what the
libraries print when imported is seen too). stderr holds only our own lines, and bitsandbytes is imported only
where it is asked for (--quant, `instruct env`)."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, write_jsonl
from instructcli import console

# `python -m instructcli`, then a note of whether the command imported bitsandbytes
ENTRY = """
import json, os, runpy, sys
try:
    runpy.run_module("instructcli", run_name="__main__", alter_sys=True)
finally:  # whether the command imported bitsandbytes
    with open(os.environ["BNB_REPORT"], "w") as f:
        json.dump(sys.modules.get("bitsandbytes") is not None, f)
"""

FOREIGN = re.compile("|".join((
    r"\d+%\||it/s\]|s/it\]",  # a tqdm bar
    r"^\S+:\d+: \w*Warning: ", r"^\s*warnings\.warn\(",  # the warnings module: file:line: Category: text, its line
    r"kernels-community", r"^Failed to load",  # bitsandbytes' optional hub kernel, at import
    r"^\[(transformers|peft|accelerate|torch)\]", r"^(WARNING|INFO|DEBUG|ERROR)\b",  # library loggers
    r"^[A-Z]\w*: ",  # a library's logger with no handler ("MatMul8bitLt: inputs will be cast ..."); ours: lower case
    r"^Traceback",
)))


# what a user's shell does not set (the CLI sets the first three for the libraries; this process may have them)
USERS_UNSET = ("HF_HUB_DISABLE_PROGRESS_BARS", "HF_DATASETS_DISABLE_PROGRESS_BARS", "TRANSFORMERS_VERBOSITY",
               "INSTRUCT_DEBUG")


def foreign(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if FOREIGN.search(line)]


@pytest.fixture(scope="module")
def instruct(tmp_path_factory):
    """Runs `instruct ARGS` in a fresh process as a user's shell would (none of the variables the CLI sets for
    the libraries inherited from this test process): (exit code, stderr, whether bitsandbytes was imported)."""
    work = tmp_path_factory.mktemp("quiet")
    env = {k: v for k, v in os.environ.items() if k not in USERS_UNSET}
    env.update(HF_HUB_OFFLINE="1", INSTRUCT_CACHE=str(work / "cache"), BNB_REPORT=str(work / "bnb.json"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))

    def run(*args, stdin: str | None = None, extra_env: dict | None = None):
        r = subprocess.run([sys.executable, "-c", ENTRY, *map(str, args)], input=stdin, capture_output=True,
                           text=True, env={**env, **(extra_env or {})}, cwd=work, timeout=300)
        return r.returncode, r.stderr, json.loads((work / "bnb.json").read_text())

    return work, run


@pytest.fixture(scope="module")
def runs(instruct, tiny_dir):
    """Every command once on the tiny model, in the walkthrough's order: {name: (code, stderr, bnb imported)}."""
    w, run = instruct
    prompts = write_jsonl(w / "prompts.jsonl", [{"prompt": "Say hello."}, {"prompt": "Two plus two?"}])
    demos = write_jsonl(w / "demos.jsonl", [{"prompt": "Say hello.", "response": "Hello!"}] * 4)
    (w / "rule.py").write_text("def shorter(prompt, response):\n    return -len(response)\n")
    rule, gen = f"{w / 'rule.py'}:shorter", ("--max-new-tokens", 4)
    out = {}
    out["sft"] = run("sft", demos, "-m", tiny_dir, "-o", w / "sft", "--max-steps", 1, "-b", 2, "--eval-frac", 0)
    out["sample"] = run("sample", w / "sft", "-p", prompts, "-n", 2, *gen, "-o", w / "samples.jsonl")
    out["label"] = run("label", w / "samples.jsonl", "-o", w / "rankings.jsonl", "--judge", rule)
    out["rm"] = run("rm", w / "rankings.jsonl", "--from", w / "sft", "-o", w / "rm", "--epochs", 1,
                    "--eval-frac", 0)
    out["score"] = run("score", w / "rm", w / "samples.jsonl", "-o", w / "scored.jsonl")
    out["ppo"] = run("ppo", "--policy", w / "sft", "--reward", w / "rm", "-p", prompts, "--ptx-coef", 0,
                     "--steps", 1, "--rollout-batch-size", 2, "--mini-batch-size", 2, *gen, "-o", w / "ppo")
    out["eval"] = run("eval", w / "ppo", "-p", prompts, *gen, "--bootstrap", 100, "-o", w / "eval")
    out["compare"] = run("compare", w / "sft", w / "ppo", "-p", prompts, "--judge", rule, *gen,
                         "--bootstrap", 100, "-o", w / "compare.jsonl")
    out["export"] = run("export", w / "ppo", w / "exported")
    out["chat"] = run("chat", tiny_dir, *gen, stdin="Hello there\n")  # a plain base: peft never needed
    out["env"] = run("env")
    out["sample --quant 8bit"] = run("sample", tiny_dir, "-p", prompts, *gen, "--quant", "8bit", "-o", "-")
    return out


def test_every_command_prints_only_our_lines(runs):
    failed = {name: code for name, (code, _, _) in runs.items() if code != 0}
    assert not failed, {name: runs[name][1][-2000:] for name in failed}
    lines = {name: foreign(err) for name, (_, err, _) in runs.items()}
    assert not any(lines.values()), {name: found[:5] for name, found in lines.items() if found}
    assert runs["sft"][1].startswith("data: ")  # ours still there


def test_bitsandbytes_is_imported_only_for_a_quantized_base(runs):
    imported = {name for name, (_, _, bnb) in runs.items() if bnb}
    assert imported == {"env", "sample --quant 8bit"}  # env probes 8-bit and 4-bit on purpose


# one process, a plain base then a quantized one: peft must see bitsandbytes again for the second
PLAIN_THEN_8BIT = """
import sys
from instructcli import models, sources
from instructcli.config import ModelConfig
tiny = sources.resolve(sys.argv[1])
models.trainable_model(tiny, ModelConfig(), "cpu")
assert "bitsandbytes" not in sys.modules
quantized = models.trainable_model(tiny, ModelConfig(quant="8bit"), "cpu")
print(sorted({type(m).__module__ for m in quantized.modules() if type(m).__module__.startswith("peft.")}))
"""


def test_a_quantized_base_after_a_plain_one_gets_peft_bitsandbytes_layers(instruct, tiny_dir):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    r = subprocess.run([sys.executable, "-c", PLAIN_THEN_8BIT, str(tiny_dir)], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "peft.tuners.lora.bnb" in r.stdout  # LoRA over Linear8bitLt, not peft's plain Linear around it


def test_debug_lets_the_libraries_talk(cli, monkeypatch):
    calls = []
    monkeypatch.setattr(console, "quiet_libraries", lambda: calls.append(1))
    assert cli("--version").code == 0 and calls == [1]
    monkeypatch.setenv("INSTRUCT_DEBUG", "1")
    assert cli("--version").code == 0 and calls == [1]


@pytest.mark.slow
def test_gguf_conversion_shows_our_progress(instruct):
    """The one-time conversion of the embedded model: our two lines, not transformers' tqdm bar."""
    w, run = instruct
    prompts = write_jsonl(w / "one.jsonl", [{"prompt": "Say hello."}])
    code, err, bnb = run("sample", "default", "-p", prompts, "--max-new-tokens", 2, "-o", "-",
                         extra_env={"INSTRUCT_CACHE": str(w / "fresh-cache")})
    assert code == 0, err[-2000:]
    assert not foreign(err), foreign(err)[:5]
    assert re.search(r"^converting SmolLM2.*once", err, re.M) and re.search(r"^converted \S+ in \d+ s$", err, re.M)
    assert not bnb
