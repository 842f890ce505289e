"""Data parallelism with 2 CPU processes (gloo), through the real launchers: N processes x batch b must take the
same steps as 1 process x batch N*b; ppo runs across processes and writes once."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(d: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    return {**env, "HF_HUB_OFFLINE": "1", "INSTRUCT_CACHE": str(d / "cache"), "PYTHONPATH": str(ROOT),
            "OMP_NUM_THREADS": "1"}


def launch(args, env, procs: int, launcher: str = "accelerate"):
    """`accelerate launch --multi_gpu` (the README's command) or torchrun; one process: plain `python -m`."""
    if procs == 1:
        pre = [sys.executable, "-m", "instructcli"]
    elif launcher == "accelerate":
        pre = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(procs),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "instructcli"]
    else:
        pre = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs),
               "--master_port", str(free_port()), "-m", "instructcli"]
    return subprocess.run([*pre, *map(str, args)], capture_output=True, text=True, env=env, timeout=900)


def rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_curves(a: list[dict], b: list[dict], keys, tol=2e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for k in keys:
            if k in ra or k in rb:
                assert ra[k] == pytest.approx(rb[k], rel=tol, abs=tol), (ra["step"], k, ra[k], rb[k])


def assert_same_adapter(a: Path, b: Path, tol=2e-5):
    wa, wb = load_file(str(a / "adapter_model.safetensors")), load_file(str(b / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=tol, atol=tol)


@pytest.fixture(scope="module")
def setup(tiny_dir, tmp_path_factory):
    d = tmp_path_factory.mktemp("parallel")
    words = "abcdefghijklmnop"
    demos = write_jsonl(d / "demos.jsonl", [{"prompt": f"Say {w}.", "response": f"{w} {w * (i % 4 + 1)}!"}
                                            for i, w in enumerate(words)])
    # K = 3 and 4 mixed, with a tie: padding of the rankings must not change the loss
    cmp = write_jsonl(d / "cmp.jsonl", [
        {"prompt": f"Q{i}?", "responses": ["yes yes", "yes", "no", "maybe"][:3 + i % 2],
         "ranks": [1, 2, 3, 3][:3 + i % 2]} for i in range(12)])
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in words])
    rule = d / "rule.py"
    rule.write_text("def count_e(prompt, response):\n    return float(response.count('e'))\n")
    return d, env_for(d), demos, cmp, prompts, rule


def test_sft_two_processes_equal_one_with_double_batch(setup, tiny_dir):
    d, env, demos, *_ = setup
    common = ["sft", demos, "-m", tiny_dir, "--max-steps", 4, "--eval-frac", 0.25, "--eval-every", 2,
              "--lr", 1e-2, "--lora-dropout", 0, "--save-every", 2, "-q"]
    two = launch([*common, "-b", 2, "-o", d / "sft2"], env, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines() == [str(d / "sft2")]  # one result line, from the main process
    one = launch([*common, "-b", 4, "-o", d / "sft1"], env, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = rows(d / "sft2"), rows(d / "sft1")
    assert len(a) == 4 and all("eval_loss" in r for r in a if r["step"] in (2, 4))
    assert_same_curves(a, b, ("loss", "eval_loss", "tokens", "epoch", "grad_norm"))
    assert_same_adapter(d / "sft2", d / "sft1")
    man = json.loads((d / "sft2" / "instruct.json").read_text())
    assert man["metrics"]["eval_loss"] == pytest.approx(b[-1]["eval_loss"], rel=2e-5)
    # one checkpoint, holding each process's random streams
    ckpts = sorted(p.name for p in (d / "sft2" / "checkpoints").iterdir())
    assert ckpts == ["step-2"]
    state = torch.load(d / "sft2" / "checkpoints" / "step-2" / "state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and state["extra"]["examples_per_step"] == 4
    assert not list(d.glob("*.partial"))

    # resume across process counts: the 2-process run's step-2 checkpoint, continued by one process
    # with batch 4, ends exactly where the uninterrupted runs did
    work = d / "sft_resumed.partial"
    shutil.copytree(d / "sft2" / "checkpoints", work / "checkpoints")
    (work / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a[:2]))
    res = launch([*common, "-b", 4, "-o", d / "sft_resumed", "--resume"], env, 1)
    assert res.returncode == 0, res.stderr[-3000:]
    assert_same_curves(rows(d / "sft_resumed"), b, ("loss", "eval_loss"))
    assert_same_adapter(d / "sft_resumed", d / "sft1")
    # a different number of examples per step would not go on where it stopped: refused
    shutil.copytree(d / "sft2" / "checkpoints", d / "sft_bad.partial" / "checkpoints")
    bad = launch([*common, "-b", 2, "-o", d / "sft_bad", "--resume"], env, 1)
    assert bad.returncode == 2 and "took 4 examples" in bad.stderr and "Traceback" not in bad.stderr


def test_rm_two_processes_equal_one_with_double_batch(setup, tiny_dir):
    d, env, _, cmp, *_ = setup
    common = ["rm", cmp, "-m", tiny_dir, "--max-steps", 3, "--eval-frac", 0.25, "--eval-every", 3,
              "--lr", 1e-2, "--lora-dropout", 0, "-q"]
    two = launch([*common, "-b", 2, "-o", d / "rm2"], env, 2, launcher="torchrun")
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.strip().splitlines() == [str(d / "rm2")]
    one = launch([*common, "-b", 4, "-o", d / "rm1"], env, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = rows(d / "rm2"), rows(d / "rm1")
    assert len(a) == 3 and "eval_accuracy" in a[-1]
    assert_same_curves(a, b, ("loss", "accuracy", "grad_norm", "eval_loss", "eval_accuracy"))
    assert_same_adapter(d / "rm2", d / "rm1")
    ma, mb = (json.loads((d / x / "instruct.json").read_text()) for x in ("rm2", "rm1"))
    # the normalisation is over every reference response, whichever process scored it
    assert ma["reward_norm"]["n"] == mb["reward_norm"]["n"] == 9
    assert ma["reward_norm"]["bias"] == pytest.approx(mb["reward_norm"]["bias"], rel=1e-4, abs=1e-5)
    ha, hb = load_file(str(d / "rm2" / "score_head.safetensors")), load_file(str(d / "rm1" / "score_head.safetensors"))
    for k in ha:
        torch.testing.assert_close(ha[k], hb[k], rtol=2e-5, atol=2e-5)


def test_ppo_two_processes_run_and_write_once(setup, tiny_dir):
    d, env, demos, _, prompts, rule = setup
    tracker = ["--report-to", "tensorboard"] if importlib.util.find_spec("tensorboard") else []  # opened once
    sft = launch(["sft", demos, "-m", tiny_dir, "--max-steps", 1, "--eval-frac", 0, "-o", d / "ppo_sft", "-q"], env, 1)
    assert sft.returncode == 0, sft.stderr[-3000:]
    p = launch(["ppo", "--policy", d / "ppo_sft", "--reward", f"{rule}:count_e", "-p", prompts, "--ptx-coef", 0,
                "--steps", 2, "--rollout-batch-size", 2, "--mini-batch-size", 1, "--max-new-tokens", 4,
                "--kl", 0.02, "--save-every", 1, "-o", d / "ppo2", "-q", *tracker], env, 2)
    assert p.returncode == 0, p.stderr[-3000:]
    out = d / "ppo2"
    assert p.stdout.strip().splitlines() == [str(out)]
    assert sorted(x.name for x in (out / "checkpoints").iterdir()) == ["step-1"]
    state = torch.load(out / "checkpoints" / "step-1" / "state.pt", weights_only=True)
    assert len(state["rng_ranks"]) == 2 and state["extra"]["rollouts_per_step"] == 4
    m = rows(out)
    assert [r["step"] for r in m] == [1, 2]  # one writer
    if tracker:  # the main process's trackers only: one event file, each step once
        from tensorboard.backend.event_processing.event_file_loader import LegacyEventFileLoader

        (events,) = (out / "tensorboard").glob("events.out.tfevents.*")
        assert [e.step for e in LegacyEventFileLoader(str(events)).Load() for v in e.summary.value
                if v.tag == "score"] == [1, 2]
    assert all(r["kl_coef"] == pytest.approx(0.02) for r in m)
    assert (out / "value_head.safetensors").is_file() and (out / "adapter_model.safetensors").is_file()
    assert json.loads((out / "instruct.json").read_text())["stage"] == "ppo"


def test_commands_that_do_not_train_refuse_a_launcher(monkeypatch, capsys):
    from instructcli import cli, parallel

    monkeypatch.setattr(parallel, "world", 2)
    monkeypatch.setattr(sys, "argv", ["instruct", "sample", "x", "-p", "y"])
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == 2
    assert "runs in one process" in capsys.readouterr().err


def test_fsdp_and_deepspeed_are_refused_with_a_reason(monkeypatch):
    from instructcli import parallel
    from instructcli.errors import InstructError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for var in ("ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"):
        monkeypatch.setenv(var, "true")
        with pytest.raises(InstructError, match="not supported"):
            parallel.init()
        monkeypatch.delenv(var)


def _collectives(rank: int, port: int, results) -> None:
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2",
                       "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"})
    from instructcli import parallel, rlhf

    parallel.init()
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]]) if rank == 0 else torch.tensor([[6.0, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]) if rank == 0 else torch.tensor([[1.0, 0.0, 0.0]])
    w = rlhf.whiten(x, mask, reduce=parallel.sum_tensor)
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 2.0]) * (rank + 1)
    q = torch.nn.Parameter(torch.zeros(1))  # no gradient on process 1: counts as zero
    q.grad = torch.tensor([5.0]) if rank == 0 else None
    parallel.sync_grads([p, q])
    results[rank] = {"whiten": w.tolist(), "p": p.grad.tolist(), "q": q.grad.tolist(),
                     "sum": parallel.sum_all(rank + 1.0, 10.0), "any": parallel.any_process(rank == 1),
                     "gather": parallel.gather([rank] * (rank + 1)), "shard": parallel.shard(list(range(6))),
                     "strided": parallel.strided(list(range(5)))}
    torch.distributed.destroy_process_group()


def test_collectives_with_two_real_processes():
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_collectives, args=(free_port(), results), nprocs=2, join=True)
    r0, r1 = results[0], results[1]
    # global whitening over [1..6] = the 6 masked values of both processes: mean 3.5, unbiased std sqrt(3.5)
    values = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    expect = [(v - 3.5) / 3.5 ** 0.5 for v in values]
    got = [*r0["whiten"][0], *r0["whiten"][1][:2], r1["whiten"][0][0]]
    assert got == pytest.approx(expect, abs=1e-5)
    assert r0["whiten"][1][2] == 0 and r1["whiten"][0][1:] == [0, 0]
    for r in (r0, r1):
        assert r["p"] == [3.0, 6.0] and r["q"] == [5.0]
        assert r["sum"] == [3.0, 20.0] and r["any"] is True
        assert r["gather"] == [0, 1, 1]
    assert (r0["shard"], r1["shard"]) == ([0, 1, 2], [3, 4, 5])
    assert (r0["strided"], r1["strided"]) == ([0, 2, 4], [1, 3])


def test_stdin_is_refused_under_a_launcher(monkeypatch):
    from instructcli import data, parallel
    from instructcli.errors import InstructError

    monkeypatch.setattr(parallel, "world", 2)
    with pytest.raises(InstructError, match="stdin cannot be shared"):
        data.load("-", "demonstrations")


def test_close_waits_for_the_others_after_a_clean_run_only(monkeypatch):
    """A process that tears down while a peer is still in its last collective makes gloo abort that peer (seen
    once in CI as SIGABRT 'terminate called without an active exception'): a clean exit meets the others in a
    barrier first; an error exit leaves at once; a second close does nothing."""
    from instructcli import parallel

    calls, alive = [], [True]

    class Dist:
        is_initialized = staticmethod(lambda: alive[0])
        barrier = staticmethod(lambda: calls.append("barrier"))

        @staticmethod
        def destroy_process_group():
            calls.append("destroy")
            alive[0] = False

    monkeypatch.setattr(parallel, "world", 2)
    monkeypatch.setattr(parallel, "_dist", lambda: Dist)
    parallel.close()
    parallel.close(clean=False)
    assert calls == ["barrier", "destroy"]
    alive[0], calls[:] = True, []
    parallel.close(clean=False)
    assert calls == ["destroy"]
