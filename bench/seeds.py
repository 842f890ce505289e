"""Several runs of one setting, judged on the same prompts, as one figure: the mean win rate over the runs with
a 95 % bootstrap CI over prompts (each prompt's outcomes averaged over the runs first, so the runs stay paired
by prompt). One seed's path moves bench/align.py's win rate by about ±0.1 (ALIGNMENT.md), so a setting is
judged on several seeds. The CI covers which prompts were drawn, for these runs; with two or three runs it
says little about the spread of further seeds, so the per-run figures are printed beside it.

    python bench/seeds.py runs/a/warm/compare.jsonl runs/b/warm/compare.jsonl runs/c/warm/compare.jsonl

Each file is an `instruct compare` output of one policy against one base (bench/align.py's compare.jsonl).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from align import rows  # noqa: E402  (bench/ is scripts, not a package)
from instructcli.stats import bootstrap_ci  # noqa: E402


def outcomes(path: Path) -> dict[str, float]:
    """Prompt id -> the policy's outcome against the base (1 win, 0.5 tie, 0 loss)."""
    if not path.is_file():
        sys.exit(f"{path}: no such file")
    out = {}
    for row in rows(path):
        if len(row["outcomes"]) != 1:
            sys.exit(f"{path}: a compare of one policy against its base is needed, got {len(row['outcomes'])}")
        out[row["id"]] = next(iter(row["outcomes"].values()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compares", nargs="+", type=Path, help="compare.jsonl of each run")
    a = ap.parse_args()
    runs = [outcomes(p) for p in a.compares]
    ids = sorted(set(runs[0]).intersection(*runs[1:]))
    if not ids:
        sys.exit("the runs share no prompt")
    per_prompt = [statistics.mean(r[i] for r in runs) for i in ids]
    lo, hi = bootstrap_ci(per_prompt)
    each = ", ".join(f"{statistics.mean(r[i] for i in ids):.3f}" for r in runs)
    print(f"{len(runs)} runs, {len(ids)} prompts: mean win rate {statistics.mean(per_prompt):.3f} "
          f"[{lo:.3f}, {hi:.3f}]; each run: {each}")


if __name__ == "__main__":
    main()
