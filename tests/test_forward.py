"""forward.hidden_states runs a prefix every row shares once: the same hidden states and the same gradients as
one full forward, on left-padded rollouts, right-padded SFT batches and peft's mixed-adapter batches."""

import pytest
import torch

from instructcli import batches, forward, models


def test_shared_prefix_on_literal_rows():
    # left-padded (pad 0): both rows start with 5 6 7 8 9 10 11 12 at positions 0..7, then differ
    ids = torch.tensor([[0, 0, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14],
                        [5, 6, 7, 8, 9, 10, 11, 12, 20, 21, 22, 23]])
    attn = (torch.arange(12) >= torch.tensor([[2], [0]])).long()
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    assert forward.shared_prefix(ids, attn, pos) == 8
    # the same tokens at other positions are no prefix
    assert forward.shared_prefix(ids, attn, torch.arange(12).expand(2, 12)) == 0
    # a row must keep a token of its own: a row of 9 real tokens caps the prefix at 8
    short = ids.clone()
    short[0, 2:] = torch.tensor([5, 6, 7, 8, 9, 10, 11, 12, 13, 0])
    short_attn = attn.clone()
    short_attn[0, 11] = 0
    assert forward.shared_prefix(short, short_attn, (short_attn.cumsum(1) - 1).clamp(min=0)) == 8
    # fewer than PREFIX_MIN in common, or a single row: nothing shared
    other = ids.clone()
    other[1, 5] = 99
    assert forward.shared_prefix(other, attn, pos) == 0
    assert forward.shared_prefix(ids[:1], attn[:1], pos[:1]) == 0


@pytest.fixture(scope="module")
def system_rollout(lm):
    """Three prompts that share a long system prompt, left-padded, with responses right-padded (one empty)."""
    m, tok, _ = lm
    system = tok.encode("the quick brown fox jumps over the lazy dog again and again")
    queries = [system + tok.encode(q) for q in ("hello there", "a", "say b b b b and more")]
    responses = [tok.encode(r) for r in ("yes yes", "", "no")]
    ids, attn, pos, start = batches.collate_rollout(queries, responses, tok.pad_token_id)
    assert forward.shared_prefix(ids, attn, pos) >= len(system)
    return ids, attn, pos, start


def lora_grads(m):
    return {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("layers", [0, 1])
def test_hidden_states_with_a_shared_prefix_equal_one_full_forward(lm, system_rollout, monkeypatch, layers):
    m, tok, _ = lm
    ids, attn, pos, start = system_rollout
    w = torch.randn(ids.shape[1] - start + 1, m.config.hidden_size, generator=torch.Generator().manual_seed(0))
    runs = []
    for prefix_min in (forward.PREFIX_MIN, 10 ** 6):  # shared, then never shared
        monkeypatch.setattr(forward, "PREFIX_MIN", prefix_min)
        m.zero_grad()
        h = forward.hidden_states(m, ids, attn, pos, layers=layers)
        # a fixed projection (not |h|^2: after the final RMS norm that is constant, and its gradient is noise)
        (h[:, start - 1:] * attn[:, start - 1:, None] * w).sum().backward()
        runs.append((h.detach(), lora_grads(m)))
    (shared, g_shared), (full, g_full) = runs
    real = attn.bool()
    assert torch.allclose(shared[real], full[real], atol=1e-5)
    assert g_full and g_shared.keys() == g_full.keys()
    for n in g_full:
        err = (g_shared[n] - g_full[n]).abs().max() / g_full[n].abs().max()
        assert err < 1e-4, (n, err)
    assert len(m.get_base_model().get_decoder().layers) == 2  # the shared base is whole again


def test_right_padded_rows_without_position_ids_share_their_prefix(lm, monkeypatch):
    """SFT's batches: right-padded, no position ids (the decoder numbers the columns)."""
    m, tok, _ = lm
    system = tok.encode("the quick brown fox jumps over the lazy dog again and again")
    batch = batches.collate_sequences([system + tok.encode(t) for t in ("one two", "three four five six", "x")],
                                      tok.pad_token_id)
    ids, attn = batch["input_ids"], batch["attention_mask"]
    assert forward.shared_prefix(ids, attn, torch.arange(ids.shape[1]).expand_as(ids)) >= len(system)
    with torch.no_grad():
        shared = forward.hidden_states(m, ids, attn)
        monkeypatch.setattr(forward, "PREFIX_MIN", 10 ** 6)
        full = forward.hidden_states(m, ids, attn)
    assert torch.allclose(shared[attn.bool()], full[attn.bool()], atol=1e-5)


def test_a_mixed_adapter_batch_reads_each_rows_own_adapter_prefix(tiny_dir, system_rollout, monkeypatch):
    """Rows through two adapters: the prefix runs once per adapter, and each row attends to its own adapter's."""
    from instructcli import sources
    from instructcli.config import ModelConfig

    src = sources.resolve(str(tiny_dir))
    m = models.trainable_model(src.as_base(), ModelConfig(), "cpu")
    m.add_adapter("other", m.peft_config["default"])
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in m.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    m.eval()
    ids, attn, pos, start = system_rollout
    names = ["default"] * 3 + ["other"] * 3
    both = [x.repeat(2, 1) for x in (ids, attn, pos)]
    with torch.no_grad():
        mixed = forward.hidden_states(m, *both, adapter_names=names)
        monkeypatch.setattr(forward, "PREFIX_MIN", 10 ** 6)
        apart = []
        for name in ("default", "other"):
            m.set_adapter(name)
            apart.append(forward.hidden_states(m, ids, attn, pos))
    apart = torch.cat(apart)
    real = both[1].bool()
    assert torch.allclose(mixed[real], apart[real], atol=1e-5)
    assert not torch.allclose(apart[:3][attn.bool()], apart[3:][attn.bool()])  # the adapters do differ
