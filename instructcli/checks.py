"""The value checks the configs run in __post_init__: each a one-line error naming the flag (exit 2)."""

from __future__ import annotations

from instructcli.errors import InstructError

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb", "trackio": "trackio"}  # --report-to name: package


def check_choice(flag: str, value, choices) -> None:
    """The one-line error (exit 2) for a value outside a flag's choices."""
    if value not in choices:
        raise InstructError(f"--{flag}: expected one of {' | '.join(choices)}, got {value!r}", 2)


def check_sampling(temperature: float, top_p: float, zero_ok: bool = True) -> None:
    """Sampling settings that yield a distribution (top-p 0 keeps no token: NaN probabilities)."""
    if temperature < 0 or (temperature == 0 and not zero_ok) or not 0 < top_p <= 1:
        raise InstructError(f"--temperature must be {'>=' if zero_ok else '>'} 0 and --top-p in (0, 1], got "
                            f"{temperature} and {top_p}", 2)


def check_positive(cfg, *names: str) -> None:
    for k in names:
        v = getattr(cfg, k)
        if v is not None and v <= 0:
            raise InstructError(f"--{k.replace('_', '-')}: must be > 0, got {v}", 2)


def check_eval_frac(eval_frac: float) -> None:
    if not 0 <= eval_frac < 1:
        raise InstructError(f"--eval-frac: must be in [0, 1), got {eval_frac}", 2)


def report_names(spec: str) -> tuple[str, ...]:
    """--report-to's trackers, in order, once each ('' or none: no tracker)."""
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    return tuple(dict.fromkeys(n for n in names if n != "none"))


def check_report_to(spec: str) -> None:
    """Known tracker names whose package is installed, checked before anything loads or is written: a missing
    package names its extra (find_spec looks the package up without importing it, so this costs nothing)."""
    from importlib.util import find_spec

    for name in report_names(spec):
        if name not in TRACKERS:
            raise InstructError(f"--report-to: expected a comma-separated list of {' | '.join(TRACKERS)}, got "
                                f"{name!r}", 2)
        if find_spec(TRACKERS[name]) is None:
            raise InstructError(f"--report-to {name} needs the {TRACKERS[name]} package: pip install "
                                f"'instruct[{name}]'", 2)


def check_hallucination_judge(spec: str) -> None:
    if spec not in ("support", "human") and not spec.startswith("rm:") and ".py:" not in spec:
        raise InstructError(f"--hallucination-judge {spec}: expected support, human, rm:DIR or path/rule.py:fn", 2)
