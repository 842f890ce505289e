"""Judges that rank responses without a person: `rm:DIR` (a reward model run dir) or `path/rule.py:function`.

A rule file is ordinary Python that runs with your permissions: only use your own. Its function takes
(prompt, response) and returns a float, higher = better.
"""

from __future__ import annotations

import importlib.util
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
