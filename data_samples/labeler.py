"""A simulated labeler for the README's main command (scripts/demo.sh). It stands in for the people who ranked
answers for InstructGPT: `instruct label SAMPLES -o RANKINGS --judge data_samples/labeler.py:prefer --noise 0.1`
ranks each prompt's K answers by this function, higher first, with 10 % of adjacent pairs swapped as a person's
slips would be. `instruct label SAMPLES -o RANKINGS` (no --judge) lets you rank them yourself instead.

Its taste: an answer that is finished (it ends a sentence instead of being cut off), to the point (about 12 to
35 words), and about what was asked (it takes up the prompt's own words) without parroting it (4-word runs
copied from the prompt or repeated count against). It never sees the reward model, so
`instruct compare --judge data_samples/labeler.py:prefer` is a judge independent of what PPO optimised.
"""

import re

_WORD = re.compile(r"[a-z0-9']+")
STOP = set("""a an and are as at be but by can could do does for from had has have how i if in into is it its
just may me more most my no not now of on one or our out so some such than that the their them then there these
they this those to up us was we were what when where which while who why will with would you your about after
also any been before both each few here him his her like make many much only other over own same she should
very write short tell give please using use""".split())  # words that say nothing about a prompt's topic


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def copied(prompt: str, response: str) -> float:
    """The share of the answer's 4-word runs that repeat the prompt or an earlier part of the answer: parroting."""
    said = words(response)
    grams = [tuple(said[i:i + 4]) for i in range(len(said) - 3)]
    p = words(prompt)
    seen, hits = {tuple(p[i:i + 4]) for i in range(len(p) - 3)}, 0
    for g in grams:
        hits += g in seen
        seen.add(g)
    return hits / len(grams) if grams else 0.0


def prefer(prompt: str, response: str) -> float:
    said = words(response)
    finished = response.rstrip().endswith((".", "!", "?", '"', "'", ")"))
    asked = {w for w in words(prompt) if len(w) > 3 and w not in STOP}
    on_topic = len(asked & set(said)) / len(asked) if asked else 0.0
    n = len(said)
    return float(finished) + on_topic - copied(prompt, response) - max(0, n - 35) / 15 - max(0, 12 - n) / 6
