"""instruct side by side with TRL on the same model, data, LoRA shape, lengths and batch sizes; a table of ratios.

    .venv/bin/python bench/vs_trl.py [--steps 8] [--batch 4] [--max-len 256] [--only sft,rm4,rm9]
    .venv/bin/python bench/vs_trl.py --only ppo [--steps 8] [--rollout-batch 8] [--mini-batch 4] [--max-new-tokens 32]
    .venv/bin/python bench/vs_trl.py --only demo

TRL goes into its own virtual environment (bench/.venv-trl, made on first use with the same torch version as
ours; never a dependency of instruct). Both sides run the embedded SmolLM2-135M model with LoRA r 16 /
alpha 32 / dropout 0.05 on all linear layers, AdamW at a constant learning rate, seed 0, and are timed over
their optimizer steps after the first (start-up, tokenising and model loading excluded on both sides):
- sft: response tokens/s on data_samples/demonstrations.jsonl, `--batch` rows per step;
- rm4 / rm9: ranked pairs/s on K = 4 rankings (data_samples/comparisons.jsonl) and on K = 9 rankings built
  from the demonstrations (each prompt's answer ranked above 8 other prompts' answers: a throughput test,
  not a preference). instruct takes `--batch` rankings per step, each forwarded once; TRL gets the same
  rankings' C(K,2) pairs per step (`--batch` x 6 or x 36 pairs, each pair forwarded as two sequences).
- ppo: seconds per PPO step (rollout + scoring + 1 PPO epoch), on data_samples/prompts.jsonl, against the last
  TRL release with a PPOTrainer (1.12.0, trl.experimental.ppo; in its own bench/.venv-trl-ppo, see
  PEER_PPO_PINS). instruct runs `ppo` from a 1-step sft run and a 1-step rm run --from it; TRL gets the plain
  model as policy (LoRA through its peft_config), reward and value (num_labels 1, random heads; the value gets
  the same LoRA + a trainable head; bench/peer_trl_ppo.py lists what still differs). `--rollout-batch`
  prompts per step, `--mini-batch` rollouts per optimizer step, `--max-new-tokens`, temperature 0.7, AdamW at
  1e-4, beta 0.02. Also the rollout (generation) tokens/s and the share of each step spent generating.
- demo: the README's main command, scripts/demo.sh (sft -> sample -> rm -> ppo-ptx -> sample -> score), wall
  clock end to end, against the same chain written with TRL 1.12.0 (bench/peer_trl_demo.py, in
  bench/.venv-trl-ppo; its docstring lists what differs, chiefly that TRL has no PPO-ptx).
Peak memory is each process's peak RSS on CPU (CUDA peak on a GPU). On a CPU shared with other work, pass
`--threads 1`: torch's default pool (one thread per core) stalls when the cores are taken (a 4x80-token forward
went from 6 s to 21 s on 2 busy cores), and whichever side meets more load loses.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / ".venv-trl"
# The last TRL release with a PPOTrainer: trl.experimental.ppo in 0.26 to 1.12.0 (trl.PPOTrainer until 0.28);
# 1.13.0 ships none. Its own requirement is transformers>=4.56.2: pinned to ours so both sides run the same
# modeling and generate() code. torch is ours too, installed first.
PEER_PPO = ROOT / "bench" / ".venv-trl-ppo"
# TRL's reward model reads the last token after every layer: so does ours here (its defaults read half the
# layers and pool the response), so that both sides do the same arithmetic
SAME_WORK_AS_TRL = ["--pool", "last", "--score-depth", 1.0, "--head-lr", 0]
PEER_PPO_PINS = ["trl==1.12.0", "transformers==5.24.0", "peft==0.21.2", "accelerate==1.15.0", "datasets==5.2.0"]


def venv_python(where: Path, packages: list[str]) -> str:
    """The peer's own virtual environment, made on first use: our torch version first, then `packages`."""
    py = where / "bin" / "python"
    if not py.exists():
        import torch

        subprocess.run([sys.executable, "-m", "venv", str(where)], check=True)
        version = torch.__version__.split("+")[0]
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={version}"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", *packages], check=True)
    return str(py)


def peer_python() -> str:
    return venv_python(PEER, ["trl", "peft"])


def peer_ppo_python() -> str:
    return venv_python(PEER_PPO, PEER_PPO_PINS)


def ours_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]  # skip warm-up


def k9_rankings(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    demos = [json.loads(x) for x in (ROOT / "data_samples" / "demonstrations.jsonl").read_text().splitlines()]
    demos = [d for d in demos if "prompt" in d]
    with open(path, "w") as f:
        for d in demos[:n]:
            others = rng.sample([x["response"] for x in demos if x is not d], 8)
            f.write(json.dumps({"prompt": d["prompt"], "responses": [d["response"], *others],
                                "ranks": [1] + list(range(2, 10))}) + "\n")


def run_ours(args: list[str]) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "instructcli", *map(str, args)], check=True, env=env,
                   stdout=subprocess.DEVNULL)


def ppo_row(a, tmp: Path, model_dir: str) -> dict:
    """instruct's ppo and TRL's PPOTrainer on the same prompts, batch shapes and lengths; s/step (ratio = TRL's
    s/step over ours: > 1 means instruct is faster, as in the throughput rows)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # one-step sft and rm runs: ppo needs their run dirs, not their quality
    quick = ["--max-steps", 1, "-b", 1, "--max-len", 128, "--schedule", "constant", "--warmup", 0, "--eval-frac", 0,
             "--save-every", 0, "--lora-dropout", 0.05, "-q", "--overwrite"]
    run_ours(["sft", ROOT / "data_samples" / "demonstrations.jsonl", "-m", "default", "-o", tmp / "ppo_sft", "--lr",
              2e-4, *quick])
    run_ours(["rm", ROOT / "data_samples" / "comparisons.jsonl", "--from", tmp / "ppo_sft", "-o", tmp / "ppo_rm",
              "--lr", 1e-4, *SAME_WORK_AS_TRL, *quick])
    prompts = ROOT / "data_samples" / "prompts.jsonl"
    load = [os.getloadavg()[0]]  # 1-minute load average before and after each side: other work skews a shared CPU
    run_ours(["ppo", "--policy", tmp / "ppo_sft", "--reward", tmp / "ppo_rm", "-p", prompts, "-o", tmp / "ppo",
              "--steps", a.steps, "--rollout-batch-size", a.rollout_batch, "--mini-batch-size", a.mini_batch,
              "--ppo-epochs", 1, "--max-new-tokens", a.max_new_tokens, "--temperature", 0.7, "--top-p", 1.0,
              "--lr", 1e-4, "--kl", 0.02, "--ptx-coef", 0, "--lora-r", 16, "--lora-alpha", 32, "--lora-dropout",
              0.05, "--seed", 0, "--save-every", 0, "-q", "--overwrite"])
    load.append(os.getloadavg()[0])
    m = ours_metrics(tmp / "ppo")
    ours_s = [r["rollout_s"] + r["optimise_s"] for r in m]
    ours_gen_s = sum(r["rollout_s"] for r in m)
    ours_tokens = sum(r["tokens_per_s"] * r["rollout_s"] for r in m)

    out, log = tmp / "peer_ppo.json", tmp / "peer_ppo.log"
    with open(log, "w") as f:  # on failure, read the log
        subprocess.run([peer_ppo_python(), str(ROOT / "bench" / "peer_trl_ppo.py"), "--model", model_dir,
                        "--prompts", str(prompts), "--steps", str(a.steps), "--batch", str(a.rollout_batch),
                        "--mini-batch", str(a.mini_batch), "--max-new-tokens", str(a.max_new_tokens), "--temperature",
                        "0.7", "--lr", "1e-4", "--kl", "0.02", "--out", str(out)], check=True, env=env,
                       stdout=f, stderr=subprocess.STDOUT)
    load.append(os.getloadavg()[0])
    p = json.loads(out.read_text())
    return {"what": "ppo", "unit": "s/step", "instruct": statistics.median(ours_s), "trl": p["median_s_per_step"],
            "ratio": p["median_s_per_step"] / statistics.median(ours_s), "steps_timed": len(m),
            "instruct_rollout_tok_s": ours_tokens / ours_gen_s, "trl_rollout_tok_s":
            sum(p["gen_tokens"]) / sum(p["gen_seconds"]), "instruct_gen_share": ours_gen_s / sum(ours_s),
            "trl_gen_share": sum(p["gen_seconds"]) / sum(p["step_seconds"]),
            "instruct_peak_mb": max(r["peak_mem_mb"] for r in m), "trl_peak_mb": p["peak_mem_mb"],
            "trl_version": p["trl"], "trl_transformers": p["transformers"], "threads": a.threads or None,
            "load_ours": load[:2], "load_trl": load[1:]}


def timed(cmd: list[str], env: dict, log: Path) -> tuple[float, float]:
    """Wall seconds and the peak RSS (MB) of the largest process of `cmd`'s tree, measured by a fresh parent."""
    probe = ("import resource, subprocess, sys, time; t = time.perf_counter(); "
             "rc = subprocess.run(sys.argv[1:]).returncode; "
             "print(time.perf_counter() - t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024); "
             "sys.exit(rc)")
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-c", probe, *cmd], env=env, stdout=subprocess.PIPE, stderr=f,
                           text=True)
    if r.returncode:
        raise SystemExit(f"{cmd[0]} failed (exit {r.returncode}); see {log}")
    seconds, peak = r.stdout.split()[-2:]
    return float(seconds), float(peak)


def demo_row(tmp: Path, model_dir: str) -> dict:
    """The README's main command (scripts/demo.sh) and its TRL chain (bench/peer_trl_demo.py), end to end."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DEMO_OUT": str(tmp / "demo"),
           "VIRTUAL_ENV": str(Path(sys.executable).parent.parent),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    load = [os.getloadavg()[0]]
    ours_s, ours_mb = timed(["bash", str(ROOT / "scripts" / "demo.sh")], env, tmp / "demo.log")
    load.append(os.getloadavg()[0])
    peer_s, peer_mb = timed([peer_ppo_python(), str(ROOT / "bench" / "peer_trl_demo.py"), "--model", model_dir,
                             "--out", str(tmp / "peer_demo")], {**os.environ, "HF_HUB_OFFLINE": "1"},
                            tmp / "peer_demo.log")
    load.append(os.getloadavg()[0])
    p = json.loads((tmp / "peer_demo" / "result.json").read_text())
    return {"what": "demo", "unit": "s end to end", "instruct": ours_s, "trl": peer_s, "ratio": peer_s / ours_s,
            "instruct_peak_mb": ours_mb, "trl_peak_mb": peer_mb, "trl_stages": p["stages"],
            "trl_reward_sft_ppo": [p["mean_reward_sft"], p["mean_reward_ppo"]], "load": load}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--only", default="sft,rm4,rm9", help="any of sft,rm4,rm9,ppo,demo")
    ap.add_argument("--rollout-batch", type=int, default=8, help="ppo: prompts per rollout")
    ap.add_argument("--mini-batch", type=int, default=4, help="ppo: rollouts per optimizer step")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="ppo: max tokens per rollout response")
    ap.add_argument("--threads", type=int, default=0, help="OMP_NUM_THREADS for every run, both sides (0 = "
                    "torch's default; 1 keeps a CPU shared with other work from stalling torch's thread pool)")
    ap.add_argument("--repeat", type=int, default=1, help="run each comparison this many times; the table shows "
                    "medians and the spread of the ratio")
    ap.add_argument("--peer-micro", type=int, default=12, help="TRL's RM micro-batch in pairs (its step keeps "
                    "all the rankings' pairs through accumulation: 72 pairs at once were killed for memory)")
    a = ap.parse_args()
    if a.threads:  # every subprocess, ours and TRL's, inherits it
        os.environ["OMP_NUM_THREADS"] = str(a.threads)
    from instructcli import sources

    model_dir = sources.resolve("default").base
    py = peer_python() if set(a.only.split(",")) - {"ppo", "demo"} else None
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    common = ["-m", "default", "--max-steps", a.steps, "-b", a.batch, "--max-len", a.max_len, "--schedule",
              "constant", "--warmup", 0, "--eval-frac", 0, "--save-every", 0, "--lora-dropout", 0.05, "-q",
              "--overwrite"]
    rows = []
    for what in [w for _ in range(a.repeat) for w in a.only.split(",")]:
        if what in ("ppo", "demo"):
            rows.append(ppo_row(a, tmp, model_dir) if what == "ppo" else demo_row(tmp, model_dir))
            print(json.dumps(rows[-1]), flush=True)
            continue
        if what == "sft":
            data = ROOT / "data_samples" / "demonstrations.jsonl"
            run_ours(["sft", data, "-o", tmp / "sft", "--lr", 2e-4, *common])
            m = ours_metrics(tmp / "sft")
            ours = sum(r["tokens"] for r in m) / sum(r["tokens"] / r["tokens_per_s"] for r in m)
            peer_args, unit, peer_batch = ["sft"], "response tokens/s", a.batch
        else:
            k = 4 if what == "rm4" else 9
            data = ROOT / "data_samples" / "comparisons.jsonl"
            if k == 9:
                data = tmp / "k9.jsonl"
                k9_rankings(data, a.batch * (a.steps + 1))
            run_ours(["rm", data, "-o", tmp / what, "--lr", 1e-4, *SAME_WORK_AS_TRL, *common])
            m = ours_metrics(tmp / what)
            pairs = k * (k - 1) // 2 * a.batch  # no ties in either file
            ours = pairs * len(m) / sum(a.batch * k / r["responses_per_s"] for r in m)
            peer_args, unit, peer_batch = ["rm"], "ranked pairs/s", pairs
            if pairs > a.peer_micro and pairs % a.peer_micro == 0:
                peer_args += ["--grad-accum", str(pairs // a.peer_micro)]
        out = tmp / f"peer_{what}.json"
        subprocess.run([py, str(ROOT / "bench" / "peer_trl.py"), *peer_args, "--model", model_dir, "--data",
                        str(data), "--steps", str(a.steps), "--batch", str(peer_batch), "--max-len",
                        str(a.max_len), "--lr", "2e-4" if what == "sft" else "1e-4", "--out", str(out)],
                       check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)
        p = json.loads(out.read_text())
        peer = (p["tokens"] if what == "sft" else p["pairs"]) / p["seconds"]
        rows.append({"what": what, "unit": unit, "instruct": ours, "trl": peer, "ratio": ours / peer,
                     "instruct_peak_mb": max(r["peak_mem_mb"] for r in m), "trl_peak_mb": p["peak_mem_mb"]})
        print(json.dumps(rows[-1]), flush=True)
    print(f"\n{'what':6s} {'unit':18s} {'instruct':>10s} {'TRL':>10s} {'ratio':>7s} {'(min-max, runs)':>16s} "
          f"{'peak MB ours/TRL':>18s}")
    for what in dict.fromkeys(r["what"] for r in rows):  # medians over the repeats
        rs = [r for r in rows if r["what"] == what]
        med = {k: statistics.median(r[k] for r in rs) for k in ("instruct", "trl", "ratio")}
        ratios = [r["ratio"] for r in rs]
        print(f"{what:6s} {rs[0]['unit']:18s} {med['instruct']:10.2f} {med['trl']:10.2f} {med['ratio']:6.2f}x "
              f"{f'({min(ratios):.2f}-{max(ratios):.2f}, {len(rs)})':>16s} "
              f"{max(r['instruct_peak_mb'] for r in rs):8.0f}/{max(r['trl_peak_mb'] for r in rs):.0f}")
    for r in rows:
        if r["what"] == "ppo":
            print(f"ppo    rollout tokens/s {r['instruct_rollout_tok_s']:.2f} / {r['trl_rollout_tok_s']:.2f} "
                  f"(ours/TRL); "
                  f"share of the step generating {r['instruct_gen_share']:.0%} / {r['trl_gen_share']:.0%}; "
                  f"{r['steps_timed']} steps timed after a warm-up; TRL {r['trl_version']}, transformers "
                  f"{r['trl_transformers']}; threads {r['threads'] or 'default'}; 1-min load before/after ours "
                  f"{r['load_ours'][0]:.1f}/{r['load_ours'][1]:.1f}, TRL "
                  f"{r['load_trl'][0]:.1f}/{r['load_trl'][1]:.1f}; "
                  f"ratio = TRL s/step over ours (> 1: instruct faster)")


if __name__ == "__main__":
    main()
