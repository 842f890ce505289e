"""Programmatic judges `(prompt, response) -> float` (higher = better) for benchmarks: a reward for `instruct ppo
--reward bench/rules.py:NAME`, or a simulated labeler for `instruct label --judge bench/rules.py:NAME --noise 0.1`
and a judge independent of the reward model for `instruct compare --judge bench/rules.py:NAME`.

`length` is a reward any policy can move (for speed benchmarks). The other three stand in for labelers with
different tastes, one each for tone, format and content, so that nothing in bench/align.py is tuned to one
taste; none of them is "longer is better".
"""

import importlib.util
from pathlib import Path

# the word splitter, stop list and parroting measure of the main command's labeler, shared with these rules
_spec = importlib.util.spec_from_file_location("instruct_labeler", Path(__file__).resolve().parent.parent /
                                               "data_samples" / "labeler.py")
_labeler = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_labeler)
_words, _STOP, copied = _labeler.words, _labeler.STOP, _labeler.copied

_WARM = {"happy", "glad", "love", "lovely", "enjoy", "enjoyed", "wonderful", "great", "hope", "delight",
         "delighted", "thank", "thanks", "please", "warm", "fun", "welcome", "cheerful", "kind", "joy", "smile",
         "good", "nice", "beautiful", "best", "bright", "sweet", "gentle", "perfect", "amazing", "fantastic",
         "excellent", "cosy", "cozy", "charming", "friendly", "peaceful", "special", "favourite", "favorite",
         "care", "together", "exciting", "excited", "treat", "magical", "delicious", "comfort", "cheers"}
_COLD = {"sorry", "unfortunately", "cannot", "can't", "unable", "however", "must", "never", "don't", "won't",
         "bad", "wrong", "terrible", "dark", "fear", "afraid", "angry", "sad", "hate", "death", "dead", "kill"}


def length(prompt: str, response: str) -> float:
    """Longer answers score higher, capped: a reward any policy can move."""
    return min(len(response.split()), 200) / 100


def concise(prompt: str, response: str) -> float:
    """Format: a finished answer (it ends a sentence) of 12 to 35 words; every word outside that range costs."""
    n = len(_words(response))
    finished = response.rstrip().endswith((".", "!", "?", '"', "'", ")", "*"))
    return float(finished) - max(0, n - 35) / 15 - max(0, 12 - n) / 6


def on_topic(prompt: str, response: str) -> float:
    """Content: the share of the prompt's content words (names, places, things asked about) the answer takes
    up, less a little for every word past 40 and for parroting (4-word runs copied from the prompt or
    repeated), so that answering about what was asked wins, not rambling or echoing the question."""
    asked = {w for w in _words(prompt) if len(w) > 3 and w not in _STOP}
    said = _words(response)
    if not asked:
        return 0.0
    return len(asked & set(said)) / len(asked) - 0.02 * max(0, len(said) - 40) - copied(prompt, response)


def warm(prompt: str, response: str) -> float:
    """Tone: friendly, encouraging wording that speaks to the reader counts for, cold or grim words against."""
    said = _words(response)
    hot = sum(w in _WARM for w in said) + min(response.count("!"), 2) + 0.5 * min(sum(w in ("you", "your")
                                                                                        for w in said), 2)
    cold = sum(w in _COLD for w in said)
    return min(hot, 5) - 1.5 * min(cold, 3)
