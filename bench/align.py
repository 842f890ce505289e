"""Simulated-preference benchmark: does the loop make the policy better, judged by a rule it never saw?

As AlpacaFarm simulates labelers, a rule (bench/rules.py) stands in for people. For each rule, through the real
CLI: sft -> sample K from SFT on the training prompts -> label --judge RULE --noise p -> rm -> ppo (plain, and
PPO-ptx with --ptx, PPO-ptx alone with --ptx-only) -> compare against SFT on held-out prompts, judged by the
same rule without noise. The RM is scored on fresh SFT samples of the held-out prompts (prompts it never saw),
ranked by the rule. PPO only ever sees the RM, so the rule is a judge independent of what PPO optimised.

    python bench/align.py --rules concise,on_topic,warm --ptx -o runs/align

Prints one table and writes OUT/results.json; every command it ran is in OUT/commands.sh.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from instructcli.stats import ratio_ci

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "bench" / "rules.py"


def sh(log: Path, *args) -> str:
    """Run `instruct ARGS`, log the command, return stdout; stop the benchmark on failure."""
    cmd = ["instruct", *map(str, args)]
    with open(log, "a") as f:
        f.write(shlex.join(cmd) + "\n")
    t0 = time.time()
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if r.returncode:
        sys.exit(f"failed ({r.returncode}): {shlex.join(cmd)}\n{r.stderr[-3000:]}")
    print(f"  {time.time() - t0:6.0f} s  {shlex.join(cmd)[:150]}", file=sys.stderr)
    return r.stdout


def rows(path: Path) -> list[dict]:
    """A JSONL file's rows (blank lines skipped); a line that is not JSON stops the script with file:line."""
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError as e:  # bad input: one line naming file:line, exit 2, no traceback
                print(f"{path}:{n}: not a JSON line ({e.msg})", file=sys.stderr)
                raise SystemExit(2) from None
    return out


def rule_fn(name: str):
    spec = importlib.util.spec_from_file_location("rules", RULES)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return getattr(mod, name)


def rm_accuracy(scored: Path, rule) -> tuple[float, int, int, list[float]]:
    """Pairwise accuracy of the RM's scores against the rule's (noise-free) order on fresh samples: pairs the
    rule does not tie. Returns (accuracy, pairs, prompts, bootstrap 95 % CI over the prompts)."""
    right, pairs = [], []  # per prompt
    scored_rows = rows(scored)
    for r in scored_rows:
        truth = [rule(r["prompt"], x) for x in r["responses"]]
        untied = [(i, j) for i in range(len(truth)) for j in range(i + 1, len(truth)) if truth[i] != truth[j]]
        pairs.append(len(untied))
        right.append(sum((truth[i] > truth[j]) == (r["scores"][i] > r["scores"][j]) for i, j in untied))
    return sum(right) / max(sum(pairs), 1), sum(pairs), len(scored_rows), list(ratio_ci(right, pairs))


def no_longer(answers: list[dict], base: str, other: str) -> tuple[float, int]:
    """The win rate (ties half) on the prompts where `other`'s answer has no more words than `base`'s: a gain
    that is only length does not show here. Returns (win rate, prompts)."""
    o = [r["outcomes"][other] for r in answers
         if len(r["responses"][other].split()) <= len(r["responses"][base].split())]
    return (sum(o) / len(o) if o else float("nan")), len(o)


def summary(eval_dir: Path) -> dict:
    return json.loads((eval_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rules", default="concise,on_topic,warm", help="functions of bench/rules.py")
    ap.add_argument("-o", "--out", default="runs/align")
    ap.add_argument("--train-prompts", default="data_samples/prompts.jsonl")
    ap.add_argument("--heldout", default="data_samples/prompts_heldout.jsonl")
    ap.add_argument("--demos", default="data_samples/demonstrations.jsonl")
    ap.add_argument("--lm-data", default="data_samples/lm_heldout.jsonl")
    ap.add_argument("--ptx-data", default="data_samples/pretrain.jsonl")
    ap.add_argument("-k", type=int, default=4, help="samples per training prompt to rank")
    ap.add_argument("--new-tokens", type=int, default=48)
    ap.add_argument("--noise", type=float, default=0.1, help="adjacent swaps of the simulated labeler")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--ptx", action="store_true", help="also PPO-ptx (--ptx-coef 27.8)")
    ap.add_argument("--ptx-only", action="store_true", help="PPO-ptx in place of plain PPO (the chain a PPO-ptx "
                    "user runs, timed as one)")
    ap.add_argument("--rm-args", default="", help="extra flags for instruct rm (defaults otherwise)")
    ap.add_argument("--ppo-args", default="", help="extra flags for instruct ppo (defaults otherwise)")
    ap.add_argument("--results", default="results.json", help="file in OUT the figures are written to")
    ap.add_argument("--reuse", action="store_true", help="keep the run dirs an earlier run of this benchmark "
                    "finished in OUT (same flags), e.g. to add --ptx afterwards")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "commands.sh"
    os.environ["HF_HUB_OFFLINE"] = "1"
    t_all = time.time()
    times: dict[str, float] = {}

    def timed(key, *args):
        t0 = time.time()
        res = sh(log, *args)
        times[key] = times.get(key, 0.0) + time.time() - t0
        return res

    # shared: the SFT model, its samples on the training and the held-out prompts, its eval
    sft = out / "sft"
    if not (sft / "instruct.json").exists():
        timed("sft", "sft", a.demos, "-o", sft, "--seed", a.seed, "-q")
    train_samples, fresh = out / "samples_train.jsonl", out / "samples_heldout.jsonl"
    for prompts, path in ((a.train_prompts, train_samples), (a.heldout, fresh)):
        if not path.exists():
            timed("sample", "sample", sft, "-p", prompts, "-n", a.k, "--temperature", 1.0, "--max-new-tokens",
                  a.new_tokens, "--seed", a.seed, "-o", path, "-q")
    if not (out / "eval_sft" / "summary.json").exists():
        timed("eval", "eval", sft, "-p", a.heldout, "--lm-data", a.lm_data, "--max-new-tokens", a.new_tokens,
              "--seed", a.seed, "--overwrite", "-o", out / "eval_sft", "-q")
    sft_eval = summary(out / "eval_sft")

    results_path = out / a.results
    earlier = json.loads(results_path.read_text())["results"] if a.reuse and results_path.exists() else []
    results = []
    for name in a.rules.split(","):
        rule, spec, d = rule_fn(name), f"{RULES}:{name}", out / name
        d.mkdir(exist_ok=True)
        t_rule = time.time()
        rankings = d / "rankings.jsonl"

        def done(run_dir: Path) -> bool:
            return a.reuse and (run_dir / "instruct.json").exists()

        if not done(d / "rm"):
            rankings.unlink(missing_ok=True)
            Path(f"{rankings}.skipped").unlink(missing_ok=True)
            timed("label", "label", train_samples, "-o", rankings, "--judge", spec, "--noise", a.noise,
                  "--seed", a.seed)
            timed("rm", "rm", rankings, "--from", sft, "-o", d / "rm", "--seed", a.seed, "--overwrite", "-q",
                  *shlex.split(a.rm_args))
            timed("score", "score", d / "rm", fresh, "-o", d / "scored_heldout.jsonl", "-q")
        acc, pairs, n_prompts, acc_ci = rm_accuracy(d / "scored_heldout.jsonl", rule)
        policies = {} if a.ptx_only else {"ppo": []}
        if a.ptx or a.ptx_only:
            policies["ppo_ptx"] = ["--ptx-coef", 27.8, "--ptx-data", a.ptx_data]
        for pol, extra in policies.items():
            if done(d / pol):
                continue
            timed("ppo", "ppo", "--policy", sft, "--reward", d / "rm", "-p", a.train_prompts, "--ptx-coef", 0,
                  *extra, "--max-new-tokens", a.new_tokens, "--seed", a.seed, "--overwrite", "-q",
                  "-o", d / pol, *shlex.split(a.ppo_args))
        cmp = json.loads(timed("compare", "compare", sft, *(d / p for p in policies), "-p", a.heldout,
                               "--judge", spec, "--max-new-tokens", a.new_tokens, "--seed", a.seed,
                               "-o", d / "compare.jsonl", "-q"))
        answers = rows(d / "compare.jsonl")
        words = {k: [len(r["responses"][k].split()) for r in answers] for k in answers[0]["responses"]}
        res = {"rule": name, "rm_accuracy_fresh": acc, "rm_accuracy_ci95": acc_ci, "rm_pairs": pairs,
               "rm_prompts": n_prompts,
               "rm_heldout_split": json.loads((d / "rm" / "instruct.json").read_text())["metrics"].get("eval_accuracy"),
               "sft_words": statistics.mean(words[str(sft)]), "policies": {}}
        for pol in policies:
            ev = d / f"eval_{pol}"
            if not (a.reuse and (ev / "summary.json").exists()):
                timed("eval", "eval", d / pol, "-p", a.heldout, "--lm-data", a.lm_data, "--max-new-tokens",
                      a.new_tokens, "--seed", a.seed, "--overwrite", "-o", ev, "-q")
            s, c = summary(ev), next(r for r in cmp["results"] if r["model"] == str(d / pol))
            m = json.loads((d / pol / "instruct.json").read_text())["metrics"]
            short = no_longer(answers, str(sft), str(d / pol))
            res["policies"][pol] = {
                "win_rate": c["win_rate"], "ci95": c["ci95"], "wins": c["wins"], "ties": c["ties"],
                "win_rate_not_longer": short[0], "prompts_not_longer": short[1],
                "losses": c["losses"], "kl": s["answers"]["kl"]["mean"],
                "response_tokens": s["answers"]["response_len"],
                "no_eos": s["answers"]["no_eos"], "words": statistics.mean(words[str(d / pol)]),
                "lm_loss": s["lm"]["loss"], "rm_score_last_step (RM-judged)": m.get("score")}
        res["minutes"] = (time.time() - t_rule) / 60
        results.append(res)
        kept = [r for r in earlier if r["rule"] not in {x["rule"] for x in results}]  # other rules' earlier runs
        results_path.write_text(json.dumps({"sft": {"lm_loss": sft_eval["lm"]["loss"],
                                                               "response_tokens": sft_eval["answers"]["response_len"],
                                                               "no_eos": sft_eval["answers"]["no_eos"]},
                                                       "results": kept + results, "stage_seconds": times,
                                                       "total_minutes": (time.time() - t_all) / 60,
                                                       "args": vars(a)}, indent=1))
    print(f"sft: held-out LM loss {sft_eval['lm']['loss']:.4f}, {sft_eval['answers']['response_len']:.1f} tokens, "
          f"no EOS {sft_eval['answers']['no_eos']:.2f}")
    print("| rule | RM acc, fresh samples [95% CI] (pairs, prompts) | policy | win rate vs SFT by the rule [95% CI] "
          "(W-T-L) | same, answers no longer than SFT's (prompts) | KL (nats) | tokens (no EOS) | words (SFT) | "
          "LM loss (SFT) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        for pol, p in r["policies"].items():
            lo, hi = r["rm_accuracy_ci95"]
            print(f"| {r['rule']} | {r['rm_accuracy_fresh']:.3f} [{lo:.3f}, {hi:.3f}] ({r['rm_pairs']}, "
                  f"{r['rm_prompts']}) | {pol} | "
                  f"{p['win_rate']:.3f} [{p['ci95'][0]:.3f}, {p['ci95'][1]:.3f}] ({p['wins']}-{p['ties']}-"
                  f"{p['losses']}) | {p['win_rate_not_longer']:.3f} ({p['prompts_not_longer']}) | "
                  f"{p['kl']:.2f} | {p['response_tokens']:.1f} ({p['no_eos']:.2f}) | "
                  f"{p['words']:.1f} ({r['sft_words']:.1f}) | {p['lm_loss']:.4f} ({sft_eval['lm']['loss']:.4f}) |")
    print(f"total {(time.time() - t_all) / 60:.1f} min; stages (s): " +
          ", ".join(f"{k} {v:.0f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
