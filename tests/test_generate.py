"""The sampling loop (models.generate) against transformers' own generate, and the sampling math."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from instructcli import data, models, rlhf
from instructcli.config import ModelConfig


@pytest.fixture(scope="module")
def lm(tiny_dir):
    src = models.resolve(str(tiny_dir))
    tok = models.load_tokenizer(src)
    m = models.trainable_model(src.as_base(), ModelConfig(), "cpu")
    with torch.no_grad():  # a non-zero adapter: generation must go through it
        for name, p in m.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    m.eval()
    prompts = [tok.encode(x) for x in ["hello there", "a", "the quick brown fox jumps over", "say b b b b"]]
    return m, tok, prompts


def reference(m, tok, prompts, eos, max_new):
    """transformers' greedy generate, cut after the first EOS as instruct does."""
    b = data.collate_prompts(prompts, tok.pad_token_id)
    out = m.generate(**b, max_new_tokens=max_new, do_sample=False, pad_token_id=tok.pad_token_id,
                     eos_token_id=eos)
    cut = []
    for seq in out[:, b["input_ids"].shape[1]:].tolist():
        end = next((j + 1 for j, x in enumerate(seq) if x == eos), len(seq))
        cut.append(seq[:end])
    return cut


def eos_choices(m, tok, prompts, max_new):
    """Tokens that end some greedy answers early and not others, so rows leave the batch at different steps."""
    seqs = reference(m, tok, prompts, tok.eos_token_id, max_new)
    return sorted({s[k] for s in seqs for k in (1, 3) if len(s) > k})[:3]


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_equals_transformers_generate_with_rows_leaving_early(lm, n):
    m, tok, prompts = lm
    checked = 0
    for eos in eos_choices(m, tok, prompts, 12):
        t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos)
        want = reference(m, tok, prompts, eos, 12)
        got = models.generate(m, t, prompts, n, 0.0, 1.0, 12, "cpu")
        assert [len(g) for g in got] == [n] * len(prompts)
        for g, w in zip(got, want):
            assert all(x == w for x in g)
        checked += len({len(w) for w in want}) > 1  # lengths differ: rows did leave early
    assert checked


def test_sampling_with_a_tiny_top_p_is_greedy(lm):
    m, tok, prompts = lm
    eos = eos_choices(m, tok, prompts, 10)[0]
    t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos)
    torch.manual_seed(0)
    assert models.generate(m, t, prompts, 2, 0.7, 1e-6, 10, "cpu") == \
        [[w, w] for w in reference(m, tok, prompts, eos, 10)]


def test_a_cache_that_cannot_be_indexed_falls_back(lm, monkeypatch):
    m, tok, prompts = lm
    eos = eos_choices(m, tok, prompts, 10)[0]
    t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos)
    monkeypatch.setattr(models, "_indexable", lambda cache: False)
    assert models.generate(m, t, prompts, 2, 0.0, 1.0, 10, "cpu") == \
        [[w, w] for w in reference(m, tok, prompts, eos, 10)]


def test_answers_are_cut_after_their_first_eos(lm):
    m, tok, prompts = lm
    torch.manual_seed(1)
    t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos_choices(m, tok, prompts, 10)[0])
    for group in models.generate(m, t, prompts, 4, 1.0, 1.0, 10, "cpu"):
        for ans in group:
            assert 1 <= len(ans) <= 10
            assert t.eos_token_id not in ans[:-1]


def test_top_p_probs_by_hand():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
    torch.testing.assert_close(rlhf.top_p_probs(logits, 1.0, 1.0), torch.tensor([[0.5, 0.3, 0.2], [0.2, 0.3, 0.5]]))
    # 0.5 reaches 0.5 alone; 0.7 needs the two most likely tokens, renormalised
    torch.testing.assert_close(rlhf.top_p_probs(logits, 1.0, 0.5), torch.tensor([[1.0, 0, 0], [0, 0, 1.0]]))
    torch.testing.assert_close(rlhf.top_p_probs(logits, 1.0, 0.7),
                               torch.tensor([[0.625, 0.375, 0], [0, 0.375, 0.625]]))
    # temperature 0.5 squares the probabilities before normalising: [25, 9, 4] / 38
    torch.testing.assert_close(rlhf.top_p_probs(logits[:1], 0.5, 1.0), torch.tensor([[25, 9, 4]]) / 38.0)


def test_sample_next_greedy_and_frequencies():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]])).expand(20000, 3)
    assert rlhf.sample_next(logits, 0.0, 1.0).tolist() == [0] * 20000
    torch.manual_seed(0)
    freq = torch.bincount(rlhf.sample_next(logits, 1.0, 0.7), minlength=3).float() / 20000
    torch.testing.assert_close(freq, torch.tensor([0.625, 0.375, 0.0]), atol=0.015, rtol=0)
