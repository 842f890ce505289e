"""Reward-model settings against one benchmark's rankings: for each rule and each set of `instruct rm` flags,
train an RM on the rule's (noisy) rankings of the SFT model's samples, score the fresh samples of the held-out
prompts, and report the accuracy against the rule's noise-free order there (bench/align.py's measure), with the
RM's own built-in split and its wall time. Only the RM changes; the samples and rankings are a finished
`bench/align.py` run's.

    python bench/rm_sweep.py runs/align --rules warm,on_topic --flags "" "--epochs 1" "--eval-frac 0"
    python bench/rm_sweep.py runs/align --extra data_samples/comparisons.jsonl   # the rankings plus other data

Prints one table; appends a JSON line per run to BENCH/rm_sweep.jsonl; the commands go to BENCH/commands.sh.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align import RULES, rm_accuracy, rule_fn, sh  # noqa: E402  (bench/ is scripts, not a package)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("bench", type=Path, help="a bench/align.py output dir (its sft, samples and rankings)")
    ap.add_argument("--rules", default="on_topic,concise,warm")
    ap.add_argument("--flags", nargs="+", default=[""], help="one quoted set of instruct rm flags per RM")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--extra", type=Path, help="also train on this file's rankings (e.g. data_samples/"
                    "comparisons.jsonl), after the rule's own")
    a = ap.parse_args()
    if a.extra and not a.extra.is_file():
        ap.error(f"--extra {a.extra}: no such file")
    os.environ["HF_HUB_OFFLINE"] = "1"
    log, out = a.bench / "commands.sh", a.bench / "rm_sweep.jsonl"
    print("| rule | rm flags | RM accuracy, fresh [95 % CI] (pairs, prompts) | built-in split | seconds |")
    print("|---|---|---|---|---|")
    for name in a.rules.split(","):
        rule, d = rule_fn(name), a.bench / name
        data = d / "rankings.jsonl"
        if a.extra:
            data = d / f"rankings_plus_{a.extra.stem}.jsonl"
            own = (d / "rankings.jsonl").read_text()
            data.write_text(own + ("" if own.endswith("\n") else "\n") + a.extra.read_text())  # no joined rows
        for i, flags in enumerate(a.flags):
            rm = d / f"rm_sweep_{i}"
            t0 = time.time()
            sh(log, "rm", data, "--from", a.bench / "sft", "-o", rm, "--seed", a.seed, "--overwrite",
               "-q", *shlex.split(flags))
            seconds = time.time() - t0
            scored = d / f"scored_sweep_{i}.jsonl"
            sh(log, "score", rm, a.bench / "samples_heldout.jsonl", "-o", scored, "-q")
            acc, pairs, prompts, (lo, hi) = rm_accuracy(scored, rule)
            split = json.loads((rm / "instruct.json").read_text())["metrics"].get("eval_accuracy")
            row = {"rule": name, "rm_flags": flags, "data": str(data), "rm_accuracy_fresh": acc,
                   "rm_accuracy_ci95": [lo, hi], "pairs": pairs,
                   "prompts": prompts, "builtin_split": split, "rm_seconds": seconds, "rules": str(RULES)}
            with open(out, "a") as f:
                f.write(json.dumps(row) + "\n")
            extra = f" + {a.extra.name}" if a.extra else ""
            print(f"| {name} | `{flags or '(defaults)'}`{extra} | {acc:.3f} [{lo:.3f}, {hi:.3f}] ({pairs}, "
                  f"{prompts}) | "
                  f"{'—' if split is None else f'{split:.3f}'} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
