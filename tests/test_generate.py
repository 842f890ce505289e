"""The sampling loop (generate.generate) against transformers' own generate, and the sampling math."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from instructcli import batches, decode_cpu, forward, generate, rlhf, tokens


def reference(m, tok, prompts, eos, max_new):
    """transformers' greedy generate, cut after the first EOS as instruct does."""
    b = batches.collate_prompts(prompts, tok.pad_token_id)
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
        got = generate.generate(m, t, prompts, n, 0.0, 1.0, 12, "cpu")
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
    assert generate.generate(m, t, prompts, 2, 0.7, 1e-6, 10, "cpu") == \
        [[w, w] for w in reference(m, tok, prompts, eos, 10)]


def test_a_cache_that_cannot_be_indexed_falls_back(lm, monkeypatch):
    m, tok, prompts = lm
    eos = eos_choices(m, tok, prompts, 10)[0]
    t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos)
    monkeypatch.setattr(generate, "_indexable", lambda cache: False)
    assert generate.generate(m, t, prompts, 2, 0.0, 1.0, 10, "cpu") == \
        [[w, w] for w in reference(m, tok, prompts, eos, 10)]


def test_answers_are_cut_after_their_first_eos(lm):
    m, tok, prompts = lm
    torch.manual_seed(1)
    t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=eos_choices(m, tok, prompts, 10)[0])
    for group in generate.generate(m, t, prompts, 4, 1.0, 1.0, 10, "cpu"):
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
    first = generate.generate(m, SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=-1), prompts, n, 0.8,
                            0.9, 10, "cpu")  # the same draws until it comes, so that row leaves early
    t = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=first[0][0][2])
    torch.manual_seed(3)
    out, lp, ent = generate.generate(m, t, prompts, n, 0.8, 0.9, 10, "cpu", logprobs=True)
    answers = [a for group in out for a in group]
    queries = [p for p in prompts for _ in range(n)]
    lens = [len(a) for a in answers]
    assert len(set(lens)) > 1 and lp.shape == ent.shape == (len(answers), max(lens))
    want = forward.response_logprobs(m, queries, answers, tok.pad_token_id, "cpu", temperature=0.8)
    ids, attn, pos, P = batches.collate_rollout(queries, answers, tok.pad_token_id, "cpu")
    with torch.no_grad():
        logits = m(input_ids=ids, attention_mask=attn, position_ids=pos).logits[:, P - 1:-1] / 0.8
    want_ent = rlhf.entropy_from_logits(logits)
    for i, k in enumerate(lens):
        torch.testing.assert_close(lp[i, :k], want[i], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ent[i, :k], want_ent[i, :k], atol=1e-5, rtol=1e-5)
        assert not lp[i, k:].any() and not ent[i, k:].any()
    assert (lp[:, 0] < 0).all() and (ent[:, 0] > 0).all()
    # keep_logits (what ppo's --stop-kl reads instead of a policy forward): the same draws, and the full forward's
    # logits at every position of each answer, zero past its end
    torch.manual_seed(3)
    out2, lp2, _, kept = generate.generate(m, t, prompts, n, 0.8, 0.9, 10, "cpu", logprobs=True, keep_logits=True)
    assert out2 == out and torch.equal(lp2, lp) and kept.shape == (len(answers), max(lens), logits.shape[-1])
    for i, k in enumerate(lens):
        torch.testing.assert_close(kept[i, :k] / 0.8, logits[i, :k], atol=1e-4, rtol=1e-5)
        assert not kept[i, k:].any()


def test_decode_linears_compute_what_the_layers_do_and_are_undone(lm):
    """The CPU decode forms of nn.Linear and of peft's LoRA Linear give the layers' own outputs (adapter on and
    off), and leaving the context restores the layers' forwards."""
    m, tok, prompts = lm
    ids = torch.tensor([[5, 6, 7, 8, 9], [8, 9, 10, 11, 12]])  # 10 rows per linear call: decode form, padded to 16
    lora = [x for x in m.modules() if type(x).__name__ == "Linear" and hasattr(x, "lora_A")]
    plain = [x for x in m.modules() if type(x) is torch.nn.Linear and not any(x is y.base_layer for y in lora)]
    with torch.no_grad():
        want = m(input_ids=ids).logits
        with m.disable_adapter():
            want_off = m(input_ids=ids).logits
        with decode_cpu.decode_linears(m):
            assert all("forward" in x.__dict__ for x in lora + plain)
            got = m(input_ids=ids).logits
            with m.disable_adapter():
                got_off = m(input_ids=ids).logits
        with decode_cpu.decode_linears(m, lora=False):  # peft's LoRA forward over decode-form linears
            assert not any("forward" in x.__dict__ for x in lora)
            assert all("forward" in x.base_layer.__dict__ for x in lora)
            torch.testing.assert_close(m(input_ids=ids).logits, want, atol=1e-5, rtol=1e-5)
    assert not any("forward" in x.__dict__ for x in m.modules())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got_off, want_off, atol=1e-5, rtol=1e-5)
    assert (want - want_off).abs().max() > 1e-2  # the adapter counts: dropping its term would fail above
    lin = torch.nn.Linear(7, 5)  # with a bias, over a 3-d input; 6 rows (as is) and 9 (padded to 16)
    for x in (torch.randn(3, 2, 7), torch.randn(3, 3, 7), torch.randn(0, 7)):  # and no rows at all
        with decode_cpu.decode_linears(lin):
            torch.testing.assert_close(lin(x), torch.nn.functional.linear(x, lin.weight, lin.bias))
    with decode_cpu.decode_linears(lin), torch.autocast("cpu", dtype=torch.bfloat16):  # autocast: its own forward
        assert lin(torch.randn(2, 7)).dtype == torch.bfloat16


def test_preallocated_cache_appends_like_concatenation(lm):
    """The in-place KV append gives the same keys, values and logits as transformers' concatenation, across a
    buffer that runs out of room and rows leaving the batch."""
    m, tok, prompts = lm
    b = batches.collate_prompts(prompts, tok.pad_token_id)
    kv = generate._cache_name(m)
    runs = []
    for prealloc in (False, True):
        attn = b["attention_mask"]
        pos = (attn.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            step = m(input_ids=b["input_ids"], attention_mask=attn, position_ids=pos, use_cache=True)
            cache, nxt, logits = step[kv], pos[:, -1:] + 1, []
            if prealloc:
                generate._preallocate(cache, 2)  # room for 2 tokens: the third append finds it full
            tokens = step.logits[:, -1].argmax(-1)
            for t in range(5):
                if t == 3:  # rows 0 and 2 leave
                    keep = torch.tensor([1, 3])
                    generate._select_rows(cache, keep)
                    if prealloc:  # rows picked in the buffers themselves: the old ones are gone already
                        assert all(x._instruct_buf[0].shape[0] == 2
                                   and x.keys.data_ptr() == x._instruct_buf[0].data_ptr() for x in cache.layers)
                    tokens, attn, nxt = tokens[keep], attn[keep], nxt[keep]
                attn = torch.cat([attn, attn.new_ones(len(attn), 1)], 1)
                step = m(input_ids=tokens[:, None], attention_mask=attn, position_ids=nxt, use_cache=True,
                         **{kv: cache})
                logits.append(step.logits[:, -1])
                tokens, nxt = step.logits[:, -1].argmax(-1), nxt + 1
        if prealloc:  # the appends went to the buffers
            assert all(x.keys.data_ptr() == x._instruct_buf[0].data_ptr() for x in cache.layers)
        runs.append((logits, [(x.keys.clone(), x.values.clone()) for x in cache.layers]))
    (want, want_kv), (got, got_kv) = runs
    for w, g in zip(want, got):
        torch.testing.assert_close(g, w)
    for (wk, wv), (gk, gv) in zip(want_kv, got_kv):
        assert gk.shape == wk.shape == (2, wk.shape[1], b["input_ids"].shape[1] + 5, wk.shape[3])
        torch.testing.assert_close(gk, wk)
        torch.testing.assert_close(gv, wv)


@pytest.mark.parametrize("kind", ["plain", "plain_training", "lora_bias", "dora", "dropout_training",
                                  "two_adapters"])
def test_decode_lora_matches_peft_or_falls_back(kind):
    """LoRA layers the decode form does not cover (a bias on B, DoRA, live dropout, two active adapters) keep
    peft's forward; a plain one takes it. Either way the output is peft's."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(12, 10), torch.nn.ReLU(), torch.nn.Linear(10, 6))
    cfg = dict(r=4, lora_alpha=8, target_modules=["0", "2"], init_lora_weights=False,
               lora_dropout=0.5 if kind == "dropout_training" else 0.0)
    m = get_peft_model(net, LoraConfig(lora_bias=kind == "lora_bias", use_dora=kind == "dora", **cfg))
    if kind == "two_adapters":
        m.add_adapter("b", LoraConfig(**cfg))
        m.base_model.set_adapter(["default", "b"])
    m.train(kind.endswith("training"))  # dropout 0 (peft's Identity) in training does not count
    x = torch.randn(5, 12)
    cls = type(m.base_model.model[0])
    calls = []
    real = cls.forward

    def counted(self, *a, **k):
        calls.append(1)
        return real(self, *a, **k)

    torch.manual_seed(1)
    want = m(x)
    cls.forward = counted
    try:
        with decode_cpu.decode_linears(m):
            torch.manual_seed(1)
            got = m(x)
    finally:
        cls.forward = real
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert len(calls) == (0 if kind.startswith("plain") else 2)  # peft's own forward, once per LoRA layer


def test_answers_stop_at_the_templates_end_of_turn_when_it_is_not_eos(lm, tiny_dir, tmp_path):
    """A chat model whose template closes turns with a token other than EOS: answers stop there too, and the
    SFT labels hold that token (before, every answer ran to the cap)."""
    from transformers import AutoTokenizer

    m, tok, prompts = lm
    other = AutoTokenizer.from_pretrained(tiny_dir)
    other.eos_token = "<|endoftext|>"  # EOS is no longer the template's <|im_end|>
    eot = other.convert_tokens_to_ids("<|im_end|>")
    assert tokens.end_of_turn_id(other) == eot != other.eos_token_id
    assert tokens.stop_token_ids(other) == sorted({eot, other.eos_token_id})
    ids, labels = tokens.encode_demonstration(other, [{"role": "user", "content": "hi"},
                                                    {"role": "assistant", "content": "hello"}])
    assert eot in [x for x in labels if x != rlhf.IGNORE_INDEX]
    stop = eos_choices(m, tok, prompts, 10)[0]  # a token some greedy answers emit: it plays the end-of-turn
    fake = SimpleNamespace(pad_token_id=tok.pad_token_id, eos_token_id=None, chat_template="x", _instruct_eot=stop)
    want = reference(m, tok, prompts, stop, 10)
    assert generate.generate(m, fake, prompts, 1, 0.0, 1.0, 10, "cpu") == [[w] for w in want]
    assert any(len(w) < 10 for w in want)
    assert tokens.ended(fake, want[0]) == (want[0][-1] == stop)
