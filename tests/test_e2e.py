"""Slow: the README's main command (scripts/demo.sh: real CLI, sft then sample) on the embedded model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_demo_script_on_the_embedded_model(tmp_path):
    env = {**os.environ, "DEMO_OUT": str(tmp_path / "demo"), "DEMO_SFT_STEPS": "2", "DEMO_PROMPTS": "3",
           "DEMO_K": "2", "DEMO_NEW_TOKENS": "12", "VIRTUAL_ENV": sys.prefix,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    r = subprocess.run(["bash", str(ROOT / "scripts/demo.sh")], capture_output=True, text=True, env=env,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    man = json.loads((tmp_path / "demo/sft/instruct.json").read_text())
    assert man["base_model"]["source"] == "default" and man["metrics"]["step"] == 2
    assert man["data"]["rows"] >= 200
    rows = [json.loads(l) for l in (tmp_path / "demo/samples.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(len(r["responses"]) == 2 for r in rows)
    assert any(r["responses"][0].strip() for r in rows)  # the real model says something
    assert f"samples:       {tmp_path / 'demo'}/samples.jsonl" in r.stdout
