"""How well the offline support check agrees with a person, per threshold: the figures behind
hallucination.MADE_UP.

Reads answers labelled by hand (data_samples/hallucination_labels_*.jsonl, in the rows `eval
--hallucination-judge human` writes: each an answer of a model to a closed-domain task, with the person's
yes/no to the paper's question "does it make up information not in the input?"), recomputes the support check of each answer, and prints, for each threshold, the agreement with
the person: accuracy, precision and recall of "made-up", Cohen's kappa, and the made-up rate each would
report. Besides the in-sample table, a two-fold check: the threshold that agrees best on one model's answers,
scored on the other model's.

    python bench/hallucination_threshold.py [--labels FILE ...]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from instructcli import hallucination  # noqa: E402

THRESHOLDS = [round(0.05 * i, 2) for i in range(13)]


def agreement(rows: list[dict], t: float) -> dict:
    tp = sum(r["share"] > t and r["made_up"] for r in rows)
    fp = sum(r["share"] > t and not r["made_up"] for r in rows)
    fn = sum(r["share"] <= t and r["made_up"] for r in rows)
    tn = len(rows) - tp - fp - fn
    n = len(rows)
    acc = (tp + tn) / n
    p_yes = ((tp + fp) / n) * ((tp + fn) / n) + ((fn + tn) / n) * ((fp + tn) / n)  # chance agreement
    return {"threshold": t, "accuracy": acc, "precision": tp / (tp + fp) if tp + fp else float("nan"),
            "recall": tp / (tp + fn) if tp + fn else float("nan"),
            "kappa": (acc - p_yes) / (1 - p_yes) if p_yes < 1 else float("nan"),
            "check_rate": (tp + fp) / n, "person_rate": (tp + fn) / n}


def best(rows: list[dict]) -> float:
    return max(THRESHOLDS, key=lambda t: (agreement(rows, t)["kappa"], -abs(t - 0.2)))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--labels", nargs="+", default=sorted(str(p) for p in Path("data_samples").glob(
        "hallucination_labels_*.jsonl")))
    a = ap.parse_args()
    rows = []
    for path in a.labels:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            s = hallucination.support(r["response"], r["prompt"])  # the prompt: the instruction, then the input
            rows.append({**r, "model": r.get("model") or Path(path).stem, "share": s.share,
                         "made_up": r["answer"] == "yes"})
    models = sorted({r["model"] for r in rows})
    counts = ", ".join(f"{m}: {sum(r['model'] == m for r in rows)}" for m in models)
    print(f"{len(rows)} answers labelled by hand ({counts}); person's made-up rate "
          f"{sum(r['made_up'] for r in rows) / len(rows):.3f}")
    for m in models:
        part = [r for r in rows if r["model"] == m]
        g = agreement(part, hallucination.MADE_UP)
        print(f"  {m}: the person {g['person_rate']:.3f}, the check at MADE_UP {g['check_rate']:.3f} "
              f"(accuracy {g['accuracy']:.3f}, recall {g['recall']:.3f})")
    print(f"{'threshold':>9} {'accuracy':>8} {'precision':>9} {'recall':>6} {'kappa':>6} {'check rate':>10}")
    for t in THRESHOLDS:
        g = agreement(rows, t)
        mark = " <- MADE_UP" if abs(t - hallucination.MADE_UP) < 1e-9 else ""
        print(f"{t:>9.2f} {g['accuracy']:>8.3f} {g['precision']:>9.3f} {g['recall']:>6.3f} {g['kappa']:>6.3f} "
              f"{g['check_rate']:>10.3f}{mark}")
    if len(models) == 2:
        for fit, held in (models, models[::-1]):
            t = best([r for r in rows if r["model"] == fit])
            g = agreement([r for r in rows if r["model"] == held], t)
            print(f"two-fold: threshold {t:.2f} chosen on {fit}'s answers; on {held}'s: accuracy {g['accuracy']:.3f}, "
                  f"kappa {g['kappa']:.3f}, rate {g['check_rate']:.3f} vs the person's {g['person_rate']:.3f}")


if __name__ == "__main__":
    main()
