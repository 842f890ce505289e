"""Decoding over a static KV cache (static_decode): on CPU the step runs eagerly, so what is not CUDA-specific
(slots kept by finished rows, the masks, the position ids, the cache's write index, the decoder pool's keys) is
checked here against the eager loop (generate.generate)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from instructcli import forward, generate, rlhf, static_decode
from test_generate import eos_choices  # stop tokens that end some greedy answers early and not others


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_tokens_equal_the_eager_loop_with_rows_stopping_early(lm, n):
    m, tok, prompts = lm
    ragged = 0
    for eos in eos_choices(m, tok, prompts, 12):
        t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos)
        want = generate.generate(m, t, prompts, n, 0.0, 1.0, 12, "cpu")
        got = static_decode.generate(m, t, prompts, n, 0.0, 1.0, 12, "cpu")
        assert got == want
        ragged += len({len(g[0]) for g in want}) > 1  # answers of different lengths: rows did stop early
    assert ragged


def test_sampled_logprobs_equal_a_full_forward_over_the_answers(lm):
    """What PPO's --old-logprobs rollout relies on: the step's log p(token) and entropy are those of a full
    forward over prompt + answer (forward.logits_from, as ppo.response_logits runs it)."""
    from instructcli import batches

    m, tok, prompts = lm
    torch.manual_seed(0)
    out, lp, ent = static_decode.generate(m, tok, prompts, 2, 0.9, 0.95, 10, "cpu", logprobs=True)
    queries = [q for q in prompts for _ in range(2)]
    answers = [a for g in out for a in g]
    ids, attn, pos, start = batches.collate_rollout(queries, answers, tok.pad_token_id)
    with torch.no_grad():
        logits = forward.logits_from(m, ids, attn, pos, start - 1)[:, :-1].float() / 0.9
    resp = ids[:, start:start + logits.shape[1]]
    want_lp = rlhf.logprobs_from_logits(logits, resp)
    want_ent = rlhf.entropy_from_logits(logits)
    mask = torch.zeros_like(want_lp)
    for i, a in enumerate(answers):
        mask[i, :len(a)] = 1
    assert lp.shape == (len(answers), max(len(a) for a in answers))
    assert torch.allclose(lp * mask[:, :lp.shape[1]], want_lp[:, :lp.shape[1]] * mask[:, :lp.shape[1]], atol=1e-5)
    assert torch.allclose(ent * mask[:, :lp.shape[1]], want_ent[:, :lp.shape[1]] * mask[:, :lp.shape[1]], atol=1e-4)
    assert (lp[mask[:, :lp.shape[1]] == 0] == 0).all()  # 0 past each answer's end, as the eager loop


def test_a_row_decodes_the_same_alone_and_beside_others(lm):
    """Slots: a row's answer does not depend on the other rows' prompts, pads or stopping."""
    m, tok, prompts = lm
    together = static_decode.generate(m, tok, prompts, 1, 0.0, 1.0, 16, "cpu")
    for p, g in zip(prompts, together):
        assert static_decode.generate(m, tok, [p], 1, 0.0, 1.0, 16, "cpu") == [g]


def test_the_cache_write_index_and_positions_follow_the_columns(lm):
    m, tok, prompts = lm
    static_decode.generate(m, tok, prompts, 1, 0.0, 1.0, 9, "cpu")
    dec = next(reversed(m.__dict__["_instruct_decoders"].values()))
    width = max(len(p) for p in prompts)
    assert int(dec.col) == width + 8  # 9 tokens: the prefill's and 8 steps'
    assert all(int(layer.cumulative_length) == int(dec.col) for layer in dec.cache.layers)
    assert dec.pos[:, 0].tolist() == [len(p) + 8 for p in prompts]
    seen = (dec.mask[:, 0, 0] == 0).sum(1).tolist()  # real prompt tokens + the 8 fed ones
    assert seen == [len(p) + 8 for p in prompts]


def test_prefill_mask_by_hand():
    attn = torch.tensor([[0, 1, 1], [1, 1, 1]])
    see = static_decode.prefill_mask(attn, 5, torch.float32) == 0
    assert see.shape == (2, 1, 3, 5)
    assert see[0, 0].tolist() == [[True, False, False, False, False],  # a pad sees only itself (no empty row)
                                  [False, True, False, False, False],
                                  [False, True, True, False, False]]
    assert see[1, 0].tolist() == [[True, False, False, False, False],
                                  [True, True, False, False, False],
                                  [True, True, True, False, False]]


def test_cache_lengths_round_up_to_the_bucket():
    assert static_decode.cache_len(10, 48) == 64
    assert static_decode.cache_len(16, 48) == 64
    assert static_decode.cache_len(17, 48) == 128


def test_decoders_are_reused_by_shape_and_adapter_and_rebuilt_when_either_changes(lm):
    m, tok, prompts = lm
    m.__dict__.pop("_instruct_decoders", None)
    static_decode.generate(m, tok, prompts, 1, 0.0, 1.0, 8, "cpu")
    first = next(iter(m.__dict__["_instruct_decoders"].values()))
    static_decode.generate(m, tok, prompts[::-1], 1, 0.0, 1.0, 8, "cpu")  # same rows and bucket: reused
    assert list(m.__dict__["_instruct_decoders"].values()) == [first]
    with m.disable_adapter():  # the reference (adapters off) is another graph
        off = static_decode.generate(m, tok, prompts, 1, 0.0, 1.0, 8, "cpu")
        assert off == generate.generate(m, tok, prompts, 1, 0.0, 1.0, 8, "cpu")
    assert len(m.__dict__["_instruct_decoders"]) == 2
    assert off != static_decode.generate(m, tok, prompts, 1, 0.0, 1.0, 8, "cpu")
    for k in range(static_decode.KEEP + 2):  # new shapes: the pool stays bounded
        static_decode.generate(m, tok, prompts[:1] * (k + 5), 1, 0.0, 1.0, 8, "cpu")
    assert len(m.__dict__["_instruct_decoders"]) == static_decode.KEEP


def test_adapter_weights_updated_in_place_are_seen_by_a_reused_decoder(lm):
    """PPO's optimizer updates the adapters in place between rollouts: a kept decoder (on CUDA, its graph)
    must decode with the new weights."""
    m, tok, prompts = lm
    before = static_decode.generate(m, tok, prompts, 1, 0.0, 1.0, 8, "cpu")
    saved = {n: p.detach().clone() for n, p in m.named_parameters() if "lora_B" in n}
    try:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if "lora_B" in n:
                    p.mul_(-3.0)
        after = static_decode.generate(m, tok, prompts, 1, 0.0, 1.0, 8, "cpu")
        assert after == generate.generate(m, tok, prompts, 1, 0.0, 1.0, 8, "cpu")
        assert after != before
    finally:
        with torch.no_grad():
            for n, p in m.named_parameters():
                if n in saved:
                    p.copy_(saved[n])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_captured_step_equals_the_eager_step_on_cuda(lm):
    m, tok, prompts = lm
    g = m.to("cuda")
    try:
        eager = static_decode.generate(g, tok, prompts, 2, 0.0, 1.0, 12, "cuda", capture=False)
        graph = static_decode.generate(g, tok, prompts, 2, 0.0, 1.0, 12, "cuda", capture=True)
        assert graph == eager
        assert any(d.replays for d in g.__dict__["_instruct_decoders"].values())
        with torch.no_grad():  # as PPO's optimizer does: the adapters change in place; the kept graph sees it
            for n, p in g.named_parameters():
                if "lora_B" in n:
                    p.mul_(-2.0)
        after = static_decode.generate(g, tok, prompts, 2, 0.0, 1.0, 12, "cuda", capture=True)
        assert after == static_decode.generate(g, tok, prompts, 2, 0.0, 1.0, 12, "cuda", capture=False)
        assert after != graph
        with torch.no_grad():
            for n, p in g.named_parameters():
                if "lora_B" in n:
                    p.div_(-2.0)
    finally:
        m.to("cpu")
        m.__dict__.pop("_instruct_decoders", None)
