"""Judges: `rm:DIR` (a reward model run dir) or `path/rule.py:function` scoring responses (label, compare),
and the judges of eval's hallucination check (those two, or a person answering yes/no in the label UI).

A rule file is ordinary Python that runs with your permissions: only use your own. Its function takes
(prompt, response) and returns a float, higher = better (for hallucination: > 0.5 = made-up).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path
from typing import Callable

from instructcli import data, models
from instructcli.config import ModelConfig
from instructcli.errors import InstructError

Judge = Callable[[data.Sample], list[float]]


def load_rule(spec: str) -> Callable[[str, str], float]:
    path, _, name = spec.rpartition(":")
    if not path or not name:
        raise InstructError(f"--judge {spec}: expected rm:DIR or path/to/rule.py:function", 2)
    if not Path(path).is_file():
        raise InstructError(f"--judge {spec}: {path}: no such file", 2)
    mod_spec = importlib.util.spec_from_file_location(f"instruct_rule_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(mod_spec)
    try:
        mod_spec.loader.exec_module(module)
    except Exception as e:  # noqa: BLE001 - the user's file failed to import
        raise InstructError(f"--judge {spec}: {path} failed to load: {type(e).__name__}: {e}", 2) from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InstructError(f"--judge {spec}: {path} has no function {name!r}", 2)
    return fn


def check_spec(spec: str, flag: str, log=None) -> None:
    """Refuse a bad judge before any model answers: an rm:DIR that is not a reward model, a rule file that
    does not load. Other specs (human, support) are left to the caller."""
    if spec.startswith("rm:"):
        from instructcli import sources

        sources.require_rm(sources.resolve(spec[3:], log), flag)
    elif ".py:" in spec:
        load_rule(spec)


def make_judge(spec: str, quant: str = "none", log=None) -> Judge:
    """A function from a samples row to one score per response (higher = better)."""
    if spec.startswith("rm:"):
        rm, tok, _ = models.load_reward_model(spec[3:], ModelConfig(quant=quant), models.pick_device(), log)

        def by_rm(s: data.Sample) -> list[float]:
            return models.reward_scores(rm, tok, s.messages or [{"role": "user", "content": s.prompt}], s.responses,
                                        ended=s.extra.get("ended"))

        return by_rm
    rule = load_rule(spec)

    def by_rule(s: data.Sample) -> list[float]:
        scores = []
        for r in s.responses:
            v = rule(s.prompt, r)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise InstructError(f"--judge {spec}: returned {v!r} for sample {s.id}; expected a finite number", 1)
            scores.append(float(v))
        return scores

    return by_rule


def judge_made_up(spec: str, rows: list[dict], labels_path: str = "", quant: str = "none", log=None) -> None:
    """Set each hallucination row's `made_up` by a judge other than the support check: `rm:DIR` (made-up when
    the RM scores the answer below 0, the level of its reference demonstrations), `path/rule.py:fn` (made-up
    when fn(prompt, answer) > 0.5), or `human` (the paper's yes/no question in the label UI; answers kept in
    `labels_path`, so a stopped session resumes; a skipped answer stays None)."""
    from instructcli import files, hallucination, label

    prompt = lambda r: f"{r['instruction']}\n\n{r['input']}"  # noqa: E731  (the prompt the model answered)
    if spec == "human":
        # one sample per (task, answer): a new answer to a task (another model or seed) is a new question
        key = {r["id"]: f"{r['id']}#{hashlib.sha256(r['response'].encode()).hexdigest()[:12]}" for r in rows}
        samples = f"{labels_path}.answers.jsonl"  # what the person is shown, rebuilt from this run's answers
        with files.JsonlWriter(samples) as w:
            for r in rows:
                w.write({"id": key[r["id"]], "prompt": prompt(r), "responses": [r["response"]], "model": "(hidden)"})
        label.run(samples, labels_path, question=hallucination.QUESTION)
        said = {}
        for line in Path(labels_path).read_text(encoding="utf-8").splitlines() if Path(labels_path).is_file() else []:
            if line.strip():
                row = json.loads(line)
                said[str(row["id"])] = row
        for r in rows:
            got = said.get(key[r["id"]])
            r["made_up"] = None if got is None else got["answer"] == "yes"
        return
    if spec.startswith("rm:"):
        rm, tok, _ = models.load_reward_model(spec[3:], ModelConfig(quant=quant), models.pick_device(), log)
        for r in rows:
            score = models.reward_scores(rm, tok, [{"role": "user", "content": prompt(r)}], [r["response"]],
                                         ended=[r["ended"]])[0]
            r["judge_score"], r["made_up"] = score, score < 0
        return
    rule = load_rule(spec)
    for r in rows:
        v = rule(prompt(r), r["response"])
        if isinstance(v, bool):
            v = float(v)
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise InstructError(f"--hallucination-judge {spec}: returned {v!r} for task {r['id']}; expected a "
                                "finite number (> 0.5 = made-up) or a boolean", 1)
        r["judge_score"], r["made_up"] = float(v), v > 0.5
