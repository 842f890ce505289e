"""Time and peak memory of reading a 100k-row sft file through each path data.load takes.

Writes the same 100k Alpaca rows (instruction, input, output; ~60 words each) as JSONL, CSV, parquet, a JSON
array, an arrow file and a save_to_disk dir, then reads each in a fresh process with
`data.load(path, "demonstrations")` (schema recognition and validation included) and prints the wall time
the process's peak resident memory (imports included), and the resident memory the read added and kept (the
100k records held, what a training stage then works from).

    python bench/read_data.py [--rows 100000]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHILD = """
import resource, sys, time
import psutil
from instructcli import data
import datasets, jsonlines
base = psutil.Process().memory_info().rss // 2**20
t = time.perf_counter()
got = data.load(sys.argv[1], "demonstrations")
took = time.perf_counter() - t
held = psutil.Process().memory_info().rss // 2**20 - base
print(got.rows, got.format, round(took, 2), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024, held)
"""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=100_000)
    a = ap.parse_args()
    import datasets

    datasets.disable_progress_bars()

    words = "the river runs under a stone bridge while the town sleeps and lamps burn low".split()
    rows = [{"instruction": f"Write about item {i}: " + " ".join(words[(i + j) % len(words)] for j in range(12)),
             "input": "" if i % 3 else "Some context " + " ".join(words[:8]),
             "output": " ".join(words[(i * 7 + j) % len(words)] for j in range(40))} for i in range(a.rows)]
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        with open(d / "d.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        ds = datasets.Dataset.from_list(rows)
        ds.to_csv(str(d / "d.csv"), index=False)
        ds.to_parquet(str(d / "d.parquet"))
        (d / "d.json").write_text(json.dumps(rows))  # a JSON array
        ds.save_to_disk(str(d / "saved"))
        arrow = next((d / "saved").glob("*.arrow"))
        env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_CACHE": str(d / "cache"), "PYTHONPATH": str(ROOT),
               "PATH": "/usr/bin:/bin"}
        print(f"{a.rows} rows; python {sys.version.split()[0]}, datasets {datasets.__version__}")
        print(f"{'path':<14} {'format':<13} {'file MB':>8} {'seconds':>8} {'peak RSS MB':>12} {'held MB':>8}")
        for name, p in (("JSONL", d / "d.jsonl"), ("CSV", d / "d.csv"), ("parquet", d / "d.parquet"),
                        ("JSON array", d / "d.json"), ("arrow", arrow), ("save_to_disk", d / "saved")):
            size = sum(x.stat().st_size for x in p.rglob("*")) if p.is_dir() else p.stat().st_size
            out = subprocess.run([sys.executable, "-c", CHILD, str(p)], capture_output=True, text=True, env=env)
            if out.returncode:
                print(f"{name:<14} failed: {out.stderr.strip().splitlines()[-1]}")
                continue
            n, fmt, secs, rss, held = out.stdout.split()
            print(f"{name:<14} {fmt:<13} {size / 2**20:>8.1f} {float(secs):>8.2f} {int(rss):>12} {int(held):>8}")


if __name__ == "__main__":
    main()
