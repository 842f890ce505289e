"""Slow: the README's main command (scripts/demo.sh: sft -> sample K -> label by the simulated labeler -> rm ->
ppo -> compare by the labeler, the real CLI) on the embedded model, at tiny sizes."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_script_on_the_embedded_model(tmp_path):
    env = {**os.environ, "DEMO_OUT": str(tmp_path / "demo"), "DEMO_SFT_STEPS": "2", "DEMO_PROMPTS": "4",
           "DEMO_K": "3", "DEMO_NEW_TOKENS": "8", "DEMO_RM_EPOCHS": "1", "DEMO_PPO_STEPS": "1",
           "DEMO_PPO_BATCH": "2", "DEMO_HELDOUT": "3", "VIRTUAL_ENV": sys.prefix,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "scripts/demo.sh")], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    demo = tmp_path / "demo"
    man = json.loads((demo / "sft/instruct.json").read_text())
    assert man["base_model"]["source"] == "default" and man["metrics"]["step"] == 2 and man["data"]["rows"] >= 200
    samples = [json.loads(l) for l in (demo / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(len(s["responses"]) == len(s["ended"]) == 3 for s in samples)
    rankings = [json.loads(l) for l in (demo / "rankings.jsonl").read_text().splitlines()]
    assert rankings and all(sorted(set(x["ranks"]))[0] == 1 and "ended" in x for x in rankings)  # on-policy rows
    rm = json.loads((demo / "rm/instruct.json").read_text())
    assert rm["merged"] == [str((demo / "sft").resolve())] and rm["data"]["rows"] == len(rankings)
    ppo = json.loads((demo / "ppo/instruct.json").read_text())
    assert ppo["stage"] == "ppo" and ppo["config"]["ptx_coef"] == 0 and ppo["metrics"]["step"] == 1
    cmp = json.loads((demo / "compare.json").read_text())
    assert cmp["judge"] == "data_samples/labeler.py:prefer" and cmp["prompts"] == 3
    assert "win rate vs SFT, judged by prefer" in r.stdout and "KL to SFT" in r.stdout
    kl = cmp["answers"][1]["kl"]  # the table's KL is compare's, of PPO's judged answers to its parent, the SFT
    assert Path(kl["reference"]).resolve() == (demo / "sft").resolve() and kl["n"] == 3
    assert f"| {kl['mean']:.2f} [{kl['ci95'][0]:.2f}, {kl['ci95'][1]:.2f}] |" in r.stdout
    acc = re.search(r"^rm accuracy on fresh answers to 3 unseen prompts \(by the labeler\): ([\d.]+) \[([\d.]+|nan), "
                    r"([\d.]+|nan)\] \((\d) pairs\)$", r.stdout, re.M)
    assert acc, r.stdout  # with its bootstrap CI over the prompts (nan when the labeler tied every pair)
    if int(acc.group(4)):
        assert float(acc.group(2)) <= float(acc.group(1)) <= float(acc.group(3))
    # each of the 6 stages' seconds follows its heading on stderr, and they add up to the total
    took = [int(s) for s in re.findall(r"^   \((\d+) s\)$", r.stderr, re.M)]
    total = int(re.search(r"^== done in (\d+) s$", r.stderr, re.M).group(1))
    assert len(took) == 6 and abs(sum(took) - total) <= 1
