"""Crash safety with real processes: `instruct sft|rm|ppo` are started as subprocesses and SIGKILLed at random
moments (checkpoints are written every step, so many kills land inside a checkpoint write), then resumed,
until they finish. After every kill: the output dir is absent or complete and loadable, and every checkpoint
in `<out>.partial` loads. At the end: the loss curve equals an uninterrupted run's within 1e-4. Ctrl-C: the
first SIGINT checkpoints and exits 130 with a resume hint; a second one exits at once.

The default suite runs one trial per stage; `pytest -m soak tests/test_crash.py` runs the long version
(INSTRUCT_SOAK_TRIALS per stage, default 8: 24 trials).
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import write_jsonl

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"sft": ("loss",), "rm": ("loss", "accuracy"), "ppo": ("score", "policy_loss", "value_loss", "kl")}


@pytest.fixture(scope="module")
def stage_args(tiny_dir, tmp_path_factory):
    """The command line of each stage on the tiny model, sized to run a few seconds after start-up."""
    d = tmp_path_factory.mktemp("crash")
    demos = write_jsonl(d / "demos.jsonl", [{"prompt": f"Say {w}.", "response": f"{w} {w}!"} for w in "abcdefgh"])
    cmp = write_jsonl(d / "cmp.jsonl", [{"prompt": f"Q{i}?", "responses": ["yes yes", "yes", "no"],
                                         "ranks": [1, 2, 3]} for i in range(8)])
    prompts = write_jsonl(d / "prompts.jsonl", [{"prompt": f"Write about {w}."} for w in "abcdefgh"])
    rule = d / "rule.py"
    rule.write_text("def count_e(prompt, response):\n    return float(response.count('e'))\n")
    env = child_env(d)
    sft_dir = d / "sft"
    p = run(["sft", demos, "-m", tiny_dir, "-o", sft_dir, "--max-steps", 2, "-b", 4, "--eval-frac", 0, "-q"], env)
    assert p.returncode == 0, p.stderr
    common = ["--save-every", 1, "--keep-checkpoints", 2, "-q"]
    return d, env, {
        "sft": ["sft", demos, "-m", tiny_dir, "--max-steps", 16, "-b", 2, "--eval-frac", 0, "--lr", 1e-2,
                "--lora-dropout", 0.1, *common],
        "rm": ["rm", cmp, "-m", tiny_dir, "--max-steps", 12, "-b", 2, "--eval-frac", 0, "--lr", 1e-2, *common],
        "ppo": ["ppo", "--policy", sft_dir, "--reward", f"{rule}:count_e", "-p", prompts, "--ptx-coef", 0,
                "--steps", 8, "--rollout-batch-size", 4, "--mini-batch-size", 2, "--max-new-tokens", 6,
                "--lora-targets", "q_proj,v_proj", "--lr", 1e-2, *common],
    }


def child_env(d: Path) -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "INSTRUCT_CACHE": str(d / "cache"),
            "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def cmd(args) -> list[str]:
    return [sys.executable, "-m", "instructcli", *map(str, args)]


def run(args, env):
    return subprocess.run(cmd(args), capture_output=True, text=True, env=env, timeout=600)


def curve(out: Path, stage: str) -> list[tuple]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], *(r[k] for k in KEYS[stage])) for r in rows]


def check_invariants(out: Path) -> int:
    """Nothing on disk is partial: returns how many checkpoints were checked."""
    from instructcli import sources

    if out.exists():  # renamed into place only when complete: it must load
        src = sources.resolve(str(out))
        assert src.manifest["stage"] in ("sft", "rm", "ppo")
        load_file(str(out / "adapter_model.safetensors"))
    n = 0
    for ck in (Path(str(out) + ".partial") / "checkpoints").glob("step-*"):
        load_file(str(ck / "trainable.safetensors"))
        state = torch.load(ck / "state.pt", weights_only=True)
        assert state["step"] == int(ck.name.split("-")[1])
        n += 1
    return n


def kill_trial(stage: str, args, env, out: Path, window: tuple[float, float], rng: random.Random,
               max_kills: int = 3, signals=(signal.SIGKILL,)) -> dict:
    """Start, SIGKILL (or another of `signals`) at a random moment of the training window, check, resume;
    repeat until the run completes. SIGTERM must end in a graceful stop (143) or, before the loop runs, the
    default termination."""
    kills = checked = 0
    while True:
        resume = ["--resume"] if Path(str(out) + ".partial").is_dir() else ["--overwrite"]
        p = subprocess.Popen(cmd([*args, "-o", out, *resume]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             env=env, text=True)
        if kills < max_kills:
            try:
                p.wait(timeout=rng.uniform(*window))
            except subprocess.TimeoutExpired:
                sig = rng.choice(signals)
                p.send_signal(sig)
                err = p.communicate(timeout=600)[1]
                if sig != signal.SIGKILL:
                    assert p.returncode in (128 + sig, -sig, 0), err
                kills += 1
                checked += check_invariants(out)
                if p.returncode == 0:
                    return {"kills": kills, "checkpoints_checked": checked}
                continue
        err = p.communicate(timeout=600)[1]
        assert p.returncode == 0, err
        checked += check_invariants(out)
        return {"kills": kills, "checkpoints_checked": checked}


def trials(stage_args, stage: str, n: int, seed: int, signals=(signal.SIGKILL,)) -> list[dict]:
    d, env, all_args = stage_args
    args = all_args[stage]
    ref = d / f"{stage}-ref"
    t0 = time.time()
    p = subprocess.Popen(cmd([*args, "-o", ref, "--overwrite"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env, text=True)
    wait_for_metrics(ref, p)
    first_s = time.time() - t0  # start-up and model loading end here: kills aim at the training that follows
    assert p.wait(timeout=600) == 0, p.stderr.read()
    window = (0.8 * first_s, 0.95 * (time.time() - t0))
    want = curve(ref, stage)
    rng = random.Random(seed)
    results = []
    for i in range(n):
        out = d / f"{stage}-trial-{seed}-{i}"
        res = kill_trial(stage, args, env, out, window, rng, signals=signals)
        got = curve(out, stage)
        assert [g[0] for g in got] == [w[0] for w in want], (res, got)
        for g, w in zip(got, want):
            assert g == pytest.approx(w, abs=1e-4), (stage, i, res, g, w)
        results.append(res)
    return results


@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_sigkill_at_random_moments_loses_nothing(stage_args, stage):
    res = trials(stage_args, stage, 1, seed=1)
    assert sum(r["kills"] for r in res) >= 1


@pytest.mark.soak
@pytest.mark.parametrize("stage", ["sft", "rm", "ppo"])
def test_sigkill_soak(stage_args, stage):
    n = int(os.environ.get("INSTRUCT_SOAK_TRIALS", "8"))
    t0 = time.time()
    res = trials(stage_args, stage, n, seed=100, signals=(signal.SIGKILL, signal.SIGTERM))
    kills = sum(r["kills"] for r in res)
    print(f"\nsoak {stage}: {n} trials, {kills} SIGKILLs or SIGTERMs, {sum(r['checkpoints_checked'] for r in res)} checkpoint "
          f"loads checked, every resumed curve equal to the uninterrupted one, {time.time() - t0:.0f} s")
    assert kills >= n


# ------------------------------------------------------------------------------------------------- Ctrl-C
def wait_for_metrics(out: Path, p, lines: int = 1, timeout: float = 120) -> bool:
    """Wait until the running command has logged `lines` steps; False if it ended first."""
    path = Path(str(out) + ".partial") / "metrics.jsonl"
    t0 = time.time()
    while time.time() - t0 < timeout and p.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= lines:
            return True
        time.sleep(0.02)
    if p.poll() is not None:
        return False
    raise AssertionError("the run logged no step in time")


def slow_ppo(all_args, tmp_path) -> list:
    """ppo for 100 steps against a judge that takes 0.25 s per response (each step lasts over a second), with
    no periodic checkpoint: only a stop writes one."""
    slow = tmp_path / "slow.py"
    slow.write_text("import time\n\ndef f(prompt, response):\n    time.sleep(0.25)\n    return 1.0\n")
    args = list(all_args["ppo"])
    args[args.index("--reward") + 1] = f"{slow}:f"
    args[args.index("--steps") + 1] = 100
    args[args.index("--save-every") + 1] = 1000
    return args


def stop_with(args, out: Path, env, sig, lines: int = 1) -> int:
    """Start a run, send `sig` once it has logged `lines` steps: it must finish the step, write exactly one
    loadable checkpoint, print the resume hint and exit 128 + sig. Returns the checkpoint's step."""
    p = subprocess.Popen(cmd([*args, "-o", out]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, text=True)
    assert wait_for_metrics(out, p, lines=lines)
    p.send_signal(sig)
    err = p.communicate(timeout=120)[1]
    assert p.returncode == 128 + sig, err
    assert "continue with the same command plus --resume" in err and "Traceback" not in err
    if sig != signal.SIGINT:
        assert signal.Signals(sig).name in err
    ckpts = list((Path(str(out) + ".partial") / "checkpoints").glob("step-*"))
    assert len(ckpts) == 1 and check_invariants(out) == 1
    return int(ckpts[0].name.split("-")[1])


def test_first_sigint_checkpoints_and_exits_130_second_exits_at_once(stage_args, tmp_path):
    d, env, all_args = stage_args
    args = slow_ppo(all_args, tmp_path)
    out = tmp_path / "int"
    step = stop_with(args, out, env, signal.SIGINT)
    # resume continues after that step; a second Ctrl-C in a step stops at once, without a checkpoint
    p = subprocess.Popen(cmd([*args, "-o", out, "--resume"]), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                         env=env, text=True)
    assert wait_for_metrics(out, p, lines=step + 1)
    time.sleep(0.3)  # inside the next step
    p.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.time()
    p.send_signal(signal.SIGINT)
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 130 and time.time() - t0 < 5, err
    assert "Traceback" not in err
    steps = [json.loads(x)["step"] for x in (Path(str(out) + ".partial") / "metrics.jsonl").read_text().splitlines()]
    assert steps[:step + 1] == list(range(1, step + 2))
    assert [c.name for c in (Path(str(out) + ".partial") / "checkpoints").glob("step-*")] == [f"step-{step}"]


def test_label_killed_mid_session_keeps_every_answer(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": f"x{i}", "prompt": f"P{i}", "responses": ["a", "b", "c"]}
                                                 for i in range(4)])
    out = tmp_path / "ranked.jsonl"
    env = child_env(tmp_path)
    p = subprocess.Popen(cmd(["label", samples, "-o", out]), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, env=env, text=True)
    for answer in ("1 2 3\n", "3 2 1\n"):
        p.stdin.write(answer)
        p.stdin.flush()
    t0 = time.time()
    while (not out.exists() or len(out.read_text().splitlines()) < 2) and time.time() - t0 < 60:
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)  # no chance to flush anything more
    p.wait()
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [(r["id"], r["ranks"]) for r in rows] == [("x0", [1, 2, 3]), ("x1", [3, 2, 1])]
    p = subprocess.run(cmd(["label", samples, "-o", out]), input="2 1 3\n1=2 3\nq\n", capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["x0", "x1", "x2", "x3"] and rows[3]["ranks"] == [1, 1, 2]


# ------------------------------------------------------------------------------------- SIGTERM and SIGHUP
def steps_logged(out: Path) -> list[int]:
    return [json.loads(x)["step"] for x in (Path(str(out) + ".partial") / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("stage,sig", [("sft", signal.SIGTERM), ("rm", signal.SIGHUP)])
def test_sigterm_and_sighup_stop_like_the_first_ctrl_c_and_the_run_resumes_exactly(stage_args, tmp_path, stage,
                                                                                  sig):
    """What docker stop, Slurm preemption, `timeout` (SIGTERM) or a closed terminal (SIGHUP) send: the step
    ends, a checkpoint is written, exit 128 + signum; resumed, the curve equals an uninterrupted run's."""
    d, env, all_args = stage_args
    args = [a for a in all_args[stage]]
    args[args.index("--max-steps") + 1] = 400  # long: the signal lands mid-run
    args[args.index("--save-every") + 1] = 1000  # only the signal writes a checkpoint
    args += ["--schedule", "constant", "--warmup", 0]  # the rate does not depend on the run's length
    out = tmp_path / "term"
    step = stop_with(args, out, env, sig, lines=2)
    assert steps_logged(out) == list(range(1, step + 1))
    # lengthening or shortening the run is allowed on resume; the result is the run of that length
    short = [*args[:args.index("--max-steps") + 1], step + 3, *args[args.index("--max-steps") + 2:]]
    r = run([*short, "-o", out, "--resume"], env)
    assert r.returncode == 0, r.stderr
    ref = tmp_path / "ref"
    assert run([*short, "-o", ref], env).returncode == 0
    got, want = curve(out, stage), curve(ref, stage)
    assert [g[0] for g in got] == list(range(1, step + 4))
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=1e-4)


def test_ppo_sigterm_checkpoints_and_exits_143(stage_args, tmp_path):
    d, env, all_args = stage_args
    args = slow_ppo(all_args, tmp_path)
    out = tmp_path / "ppo-term"
    step = stop_with(args, out, env, signal.SIGTERM)
    args[args.index("--steps") + 1] = step + 1
    r = run([*args, "-o", out, "--resume"], env)
    assert r.returncode == 0, r.stderr
    assert [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, step + 2))


def test_label_stops_at_once_on_sigterm_keeping_every_answer(tmp_path):
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": f"x{i}", "prompt": f"P{i}", "responses": ["a", "b", "c"]}
                                                 for i in range(4)])
    out = tmp_path / "ranked.jsonl"
    p = subprocess.Popen(cmd(["label", samples, "-o", out]), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, env=child_env(tmp_path), text=True)
    p.stdin.write("1 2 3\n")
    p.stdin.flush()
    t0 = time.time()
    while (not out.exists() or not out.read_text().strip()) and time.time() - t0 < 60:
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)  # waiting for the next answer
    err = p.communicate(timeout=60)[1]
    assert p.returncode == 143 and "Traceback" not in err, err
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["x0"]


# ------------------------------------------------------------------------------------- one writer per output
HOLD = ("import sys, time\nfrom instructcli import {mod}\n{expr}\nprint('held', flush=True)\ntime.sleep(120)\n")


def holder(env, mod: str, expr: str):
    """A real process that holds the lock of an output, as a running instruct does."""
    p = subprocess.Popen([sys.executable, "-c", HOLD.format(mod=mod, expr=expr)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env, text=True)
    assert p.stdout.readline().strip() == "held", p.stderr.read()
    return p


def test_a_second_writer_of_a_run_dir_is_refused_naming_the_first_and_a_dead_one_never_blocks(stage_args, tmp_path):
    d, env, all_args = stage_args
    out = tmp_path / "dup"
    args = [*all_args["sft"][:all_args["sft"].index("--max-steps")], "--max-steps", 2, "-b", 2, "--eval-frac", 0, "-q"]
    first = holder(env, "checkpoint", f"r = checkpoint.RunDir({str(out)!r})")
    try:
        for extra in ([], ["--resume"], ["--overwrite"]):
            r = run([*args, "-o", out, *extra], env)
            assert r.returncode == 2, r.stderr
            assert f"pid {first.pid}" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not out.exists() and not Path(str(out) + ".partial").exists()
    finally:
        first.kill()
        first.wait()
    assert (tmp_path / ".dup.lock").exists()  # left by the killed holder: stale
    r = run([*args, "-o", out], env)
    assert r.returncode == 0, r.stderr
    assert (out / "instruct.json").is_file() and not (tmp_path / ".dup.lock").exists()


def test_label_compare_and_eval_outputs_have_one_writer(tmp_path, tiny_dir):
    env = child_env(tmp_path)
    samples = write_jsonl(tmp_path / "s.jsonl", [{"id": "a", "prompt": "P", "responses": ["x", "yy"]}])
    rule = tmp_path / "rule.py"
    rule.write_text("def n(prompt, response):\n    return float(len(response))\n")
    out = tmp_path / "ranked.jsonl"
    first = holder(env, "files", f"lock = files.Lock({str(out)!r})")
    try:
        r = run(["label", samples, "-o", out, "--judge", f"{rule}:n"], env)
        assert r.returncode == 2 and f"pid {first.pid}" in r.stderr, r.stderr
        r = run(["compare", samples, samples.with_name("t.jsonl"), "--judge", f"{rule}:n", "-o", out], env)
        assert r.returncode == 2 and f"pid {first.pid}" in r.stderr, r.stderr
    finally:
        first.kill()
        first.wait()
    assert not out.exists()
    r = run(["label", samples, "-o", out, "--judge", f"{rule}:n"], env)
    assert r.returncode == 0 and len(out.read_text().splitlines()) == 1, r.stderr
    ev = tmp_path / "ev"
    first = holder(env, "files", f"d = files.ResultDir({str(ev)!r})")
    try:
        lm = write_jsonl(tmp_path / "lm.jsonl", [{"text": "a b c"}])
        r = run(["eval", tiny_dir, "--lm-data", lm, "-o", ev], env)
        assert r.returncode == 2 and f"pid {first.pid}" in r.stderr, r.stderr
    finally:
        first.kill()
        first.wait()
