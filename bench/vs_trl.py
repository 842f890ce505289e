"""instruct side by side with TRL on the same model, data, LoRA shape, lengths and batch sizes; a table of ratios.

    .venv/bin/python bench/vs_trl.py [--steps 8] [--batch 4] [--max-len 256] [--only sft,rm4,rm9]

TRL goes into its own virtual environment (bench/.venv-trl, made on first use with the same torch version as
ours; never a dependency of instruct). Both sides run the embedded SmolLM2-135M model with LoRA r 16 /
alpha 32 / dropout 0.05 on all linear layers, AdamW at a constant learning rate, seed 0, and are timed over
their optimizer steps after the first (start-up, tokenising and model loading excluded on both sides):
- sft: response tokens/s on data_samples/demonstrations.jsonl, `--batch` rows per step;
- rm4 / rm9: ranked pairs/s on K = 4 rankings (data_samples/comparisons.jsonl) and on K = 9 rankings built
  from the demonstrations (each prompt's answer ranked above 8 other prompts' answers: a throughput test,
  not a preference). instruct takes `--batch` rankings per step, each forwarded once; TRL gets the same
  rankings' C(K,2) pairs per step (`--batch` x 6 or x 36 pairs, each pair forwarded as two sequences).
Peak memory is each process's peak RSS on CPU (CUDA peak on a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER = ROOT / "bench" / ".venv-trl"


def peer_python() -> str:
    py = PEER / "bin" / "python"
    if not py.exists():
        import torch

        subprocess.run([sys.executable, "-m", "venv", str(PEER)], check=True)
        version = torch.__version__.split("+")[0]
        subprocess.run([str(py), "-m", "pip", "install", "-q", f"torch=={version}"], check=True)
        subprocess.run([str(py), "-m", "pip", "install", "-q", "trl", "peft"], check=True)
    return str(py)


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--only", default="sft,rm4,rm9")
    ap.add_argument("--peer-micro", type=int, default=12, help="TRL's RM micro-batch in pairs (its step keeps "
                    "all the rankings' pairs through accumulation: 72 pairs at once were killed for memory)")
    a = ap.parse_args()
    from instructcli import models

    model_dir = models.resolve("default").base
    py = peer_python()
    tmp = Path(tempfile.mkdtemp(prefix="vs_trl_"))
    common = ["-m", "default", "--max-steps", a.steps, "-b", a.batch, "--max-len", a.max_len, "--schedule",
              "constant", "--warmup", 0, "--eval-frac", 0, "--save-every", 0, "--lora-dropout", 0.05, "-q",
              "--overwrite"]
    rows = []
    for what in a.only.split(","):
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
            run_ours(["rm", data, "-o", tmp / what, "--lr", 1e-4, *common])
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
    print(f"\n{'what':6s} {'unit':18s} {'instruct':>10s} {'TRL':>10s} {'ratio':>7s} {'peak MB ours/TRL':>18s}")
    for r in rows:
        print(f"{r['what']:6s} {r['unit']:18s} {r['instruct']:10.2f} {r['trl']:10.2f} {r['ratio']:6.2f}x "
              f"{r['instruct_peak_mb']:8.0f}/{r['trl_peak_mb']:.0f}")


if __name__ == "__main__":
    main()
