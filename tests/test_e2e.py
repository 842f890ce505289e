"""Slow: the README's main command (scripts/demo.sh: sft -> sample -> rm -> ppo -> sample -> score, the real
CLI) on the embedded model, at tiny sizes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_script_on_the_embedded_model(tmp_path):
    env = {**os.environ, "DEMO_OUT": str(tmp_path / "demo"), "DEMO_SFT_STEPS": "2", "DEMO_PROMPTS": "2",
           "DEMO_K": "2", "DEMO_NEW_TOKENS": "8", "DEMO_RM_STEPS": "1", "DEMO_PPO_STEPS": "1",
           "DEMO_PPO_BATCH": "2", "VIRTUAL_ENV": sys.prefix,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "scripts/demo.sh")], capture_output=True, text=True, env=env,
                       timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    demo = tmp_path / "demo"
    man = json.loads((demo / "sft/instruct.json").read_text())
    assert man["base_model"]["source"] == "default" and man["metrics"]["step"] == 2 and man["data"]["rows"] >= 200
    assert json.loads((demo / "rm/instruct.json").read_text())["merged"] == [str((demo / "sft").resolve())]
    ppo = json.loads((demo / "ppo/instruct.json").read_text())
    assert ppo["stage"] == "ppo" and ppo["config"]["ptx_coef"] == 27.8 and ppo["metrics"]["step"] == 1
    for name in ("scored_sft.jsonl", "scored_ppo.jsonl"):
        rows = [json.loads(l) for l in (demo / name).read_text().splitlines()]
        assert len(rows) == 2 and all(len(x["scores"]) == 2 for x in rows)
    assert "mean reward on held-out prompts: sft " in r.stdout and "KL to sft" in r.stdout
