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


def test_sample_from_inverts_the_cdf():
    # zero-probability tokens first, in the middle and last are never drawn; the others at their rates
    probs = torch.tensor([[0.0, 0.1, 0.0, 0.6, 0.3, 0.0]]).expand(40000, 6)
    torch.manual_seed(0)
    x = rlhf.sample_from(probs)
    assert x.shape == (40000,) and x.dtype == torch.long
    freq = torch.bincount(x, minlength=6).float() / len(x)
    assert freq[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(freq[[1, 3, 4]], torch.tensor([0.1, 0.6, 0.3]), atol=0.01, rtol=0)
    # unnormalised rows are sampled as if normalised; a one-hot row always gives its token
    torch.testing.assert_close((rlhf.sample_from(torch.tensor([[2.0, 6.0]]).expand(40000, 2)) == 1).float().mean(),
                               torch.tensor(0.75), atol=0.01, rtol=0)
    assert rlhf.sample_from(torch.tensor([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])).tolist() == [2, 0]


@pytest.mark.parametrize("n", [1, 2])
def test_sampling_logprobs_equal_a_full_forward(lm, n):
    """The log-probs PPO takes from the sampling loop (--old-logprobs rollout) are those of a full forward over
    prompt + answer at the same temperature, entropy too; zero past each answer's end, rows leaving early."""
    m, tok, prompts = lm
    torch.manual_seed(3)  # with an EOS that never comes, then with the 3rd token of the first answer as EOS:
    first = models.generate(m, SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=-1), prompts, n, 0.8,
                            0.9, 10, "cpu")  # the same draws until it comes, so that row leaves early
    t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=first[0][0][2])
    torch.manual_seed(3)
    out, lp, ent = models.generate(m, t, prompts, n, 0.8, 0.9, 10, "cpu", logprobs=True)
    answers = [a for group in out for a in group]
    queries = [p for p in prompts for _ in range(n)]
    lens = [len(a) for a in answers]
    assert len(set(lens)) > 1 and lp.shape == ent.shape == (len(answers), max(lens))
    want = models.response_logprobs(m, queries, answers, tok.pad_token_id, "cpu", temperature=0.8)
    ids, attn, pos, P = data.collate_rollout(queries, answers, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1] / 0.8
    want_ent = rlhf.entropy_from_logits(logits)
    for i, k in enumerate(lens):
        torch.testing.assert_close(lp[i, :k], want[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[i, :k], want_ent[i, :k], atol=1e-5, rtol=1e-5)
        assert not lp[i, k:].any() and not ent[i, k:].any()
    assert (lp[:, 0] < 0).all() and (ent[:, 0] > 0).all()
