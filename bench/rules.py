"""Programmatic rewards for benchmarks (no reward model needed): `--reward bench/rules.py:length`."""


def length(prompt: str, response: str) -> float:
    """Longer answers score higher, capped: a reward any policy can move."""
    return min(len(response.split()), 200) / 100
