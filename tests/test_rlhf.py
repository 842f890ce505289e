"""rlhf.py with literal tensors and hand-computed expectations."""

import math

import pytest
import torch

from instructcli import rlhf


def test_lm_loss_sum_by_hand():
    # vocab 2, uniform logits at position 0, confident logits at position 1; position 2 has no target
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0], [5.0, 5.0]]])
    labels = torch.tensor([[-100, 1, 0]])  # targets after the shift: pos0 -> 1, pos1 -> 0
    loss, n = rlhf.lm_loss_sum(logits, labels)
    expected = math.log(2) + (-2.0 + math.log(math.exp(2) + 1))
    assert n == 2 and loss.item() == pytest.approx(expected, abs=1e-6)


def test_lm_loss_ignores_masked_targets():
    logits = torch.tensor([[[1.0, 0.0], [0.0, 3.0], [0.0, 0.0]]])
    loss, n = rlhf.lm_loss_sum(logits, torch.tensor([[-100, -100, 1]]))
    assert n == 1 and loss.item() == pytest.approx(-3.0 + math.log(1 + math.exp(3)), abs=1e-6)


def test_lr_schedule():
    assert [rlhf.lr_lambda(s, 10, 2, "constant") for s in (0, 1, 2, 9)] == [0.5, 1.0, 1.0, 1.0]
    assert rlhf.lr_lambda(2, 10, 2, "linear") == 1.0 and rlhf.lr_lambda(6, 10, 2, "linear") == 0.5
    assert rlhf.lr_lambda(6, 10, 2, "cosine") == pytest.approx(0.5)
    assert rlhf.lr_lambda(10, 10, 2, "cosine") == pytest.approx(0.0)


def test_kl_budget_is_spent_when_the_last_three_steps_average_it():
    assert rlhf.kl_budget_spent([1.0, 2.0, 3.0], 2.0)  # mean 2.0 reaches it
    assert not rlhf.kl_budget_spent([1.0, 2.0, 2.9], 2.0)  # mean 1.97
    assert not rlhf.kl_budget_spent([9.0, 9.0], 2.0)  # fewer steps than the window
    assert not rlhf.kl_budget_spent([9.0, 1.0, 1.0, 1.0], 2.0)  # only the last 3 count
    assert rlhf.kl_budget_spent([0.0, 0.0, 4.0], 1.0, window=1)
    assert not rlhf.kl_budget_spent([50.0] * 5, 0.0)  # 0 = no budget


def test_tempered_kl_is_the_kl_of_both_distributions_at_that_temperature():
    # policy logits [0, 0] and SFT's [0, ln 3 / 2]; at T 0.5 they are [0, 0] and [0, ln 3]: p = (1/2, 1/2),
    # q = (1/4, 3/4), KL(p || q) = 1/2 ln 2 + 1/2 ln(2/3) = 1/2 ln(4/3)
    logits = torch.tensor([[[0.0, 0.0], [1.0, 1.0]]])
    ref = torch.tensor([[[0.0, math.log(3) / 2], [5.0, 5.0]]])
    kl = rlhf.tempered_kl(logits, ref, 0.5)
    assert kl.shape == (1, 2)
    assert kl.tolist()[0] == pytest.approx([0.5 * math.log(4 / 3), 0.0], abs=1e-6)  # a shift of all logits: 0
    # at T 1 the same logits are p = (1/2, 1/2), q = (1/(1+√3), √3/(1+√3)): a smaller KL than at T 0.5
    q = torch.tensor([1.0, 3 ** 0.5]) / (1 + 3 ** 0.5)
    assert rlhf.tempered_kl(logits, ref, 1.0)[0, 0].item() == pytest.approx(float((0.5 * (0.5 / q).log()).sum()),
                                                                          abs=1e-6)
    assert rlhf.tempered_kl(logits, ref, 1.0)[0, 0] < kl[0, 0]


def ls(x):  # -log sigmoid(x)
    return math.log(1 + math.exp(-x))


def test_ranking_loss_k2_by_hand():
    loss, acc, n = rlhf.ranking_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 2]]))
    assert loss.item() == pytest.approx(ls(2.0)) and acc.item() == 1.0 and n.item() == 1
    loss, acc, _ = rlhf.ranking_loss(torch.tensor([[1.0, -1.0]]), torch.tensor([[2, 1]]))
    assert loss.item() == pytest.approx(ls(-2.0)) and acc.item() == 0.0


def test_ranking_loss_k4_is_mean_of_its_six_pairs():
    r = [0.5, -0.2, 1.5, 0.0]
    ranks = [2, 4, 1, 3]
    pairs = [(i, j) for i in range(4) for j in range(4) if ranks[i] < ranks[j]]
    assert len(pairs) == 6
    expected = sum(ls(r[i] - r[j]) for i, j in pairs) / 6
    loss, acc, n = rlhf.ranking_loss(torch.tensor([r]), torch.tensor([ranks]))
    assert loss.item() == pytest.approx(expected) and n.item() == 6
    # pairs (2,0) (2,3) (2,1) (0,3) (0,1) (3,1): every better response scores higher
    assert acc.item() == 1.0
    wrong = sum(r[i] <= r[j] for i, j in pairs)
    assert acc.item() == pytest.approx((6 - wrong) / 6)
    # equals the mean of the same pairs fed as K = 2 rows
    pair_losses = [rlhf.ranking_loss(torch.tensor([[r[i], r[j]]]), torch.tensor([[1, 2]]))[0].item()
                   for i, j in pairs]
    assert loss.item() == pytest.approx(sum(pair_losses) / 6)


def test_ranking_loss_ties_and_padding():
    # ranks [1, 2, 2]: pairs (0,1), (0,2) only; the tie (1,2) is skipped
    loss, _, n = rlhf.ranking_loss(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([[1, 2, 2]]))
    assert n.item() == 2 and loss.item() == pytest.approx((ls(1.0) + ls(2.0)) / 2)
    # a K = 2 prompt padded to K = 3 beside a K = 3 prompt: mean over prompts of per-prompt means
    loss, _, n = rlhf.ranking_loss(torch.tensor([[2.0, 1.0, 9.0], [0.0, 1.0, 3.0]]),
                                   torch.tensor([[1, 2, 0], [3, 2, 1]]))
    p2 = (ls(1.0) + ls(3.0) + ls(2.0)) / 3
    assert n.item() == 4 and loss.item() == pytest.approx((ls(1.0) + p2) / 2)


def test_pair_hits_per_prompt_by_hand():
    # prompt 1: ranks [2, 4, 1, 3], every better response scores higher: 6 of 6 pairs
    # prompt 2: ranks [1, 2, 2, 0] (a tie, padding): pairs (0,1) right, (0,2) wrong; prompt 3: a tie of scores misses
    hits, pairs = rlhf.pair_hits(torch.tensor([[0.5, -0.2, 1.5, 0.0], [2.0, 1.0, 3.0, 9.0], [1.0, 1.0, 0.0, 0.0]]),
                                 torch.tensor([[2, 4, 1, 3], [1, 2, 2, 0], [1, 2, 0, 0]]))
    assert hits.tolist() == [6, 1, 0] and pairs.tolist() == [6, 2, 1]
    _, acc, n = rlhf.ranking_loss(torch.tensor([[2.0, 1.0, 3.0]]), torch.tensor([[1, 2, 2]]))
    assert acc.item() == 0.5 and n.item() == 2


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert rlhf.last_token_index(mask).tolist() == [2, 4, 4, 0]




# ----------------------------------------------------------------------------------------------- PPO
def test_logprobs_and_entropy_by_hand():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])
    lp = rlhf.logprobs_from_logits(logits, torch.tensor([[1, 0]]))
    assert lp.tolist()[0] == pytest.approx([math.log(0.75), math.log(0.5)])
    ent = rlhf.entropy_from_logits(logits)[0]
    assert ent.tolist() == pytest.approx([-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)), math.log(2)])


def test_compute_rewards_kl_everywhere_score_on_last_real_token():
    scores = torch.tensor([1.0, 2.0])
    logprobs = torch.tensor([[-1.0, -2.0, -3.0], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -2.0], [-2.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = rlhf.compute_rewards(scores, logprobs, ref, mask, kl_coef=0.1)
    assert kl.flatten().tolist() == pytest.approx([0.5, 0.0, -1.0, 1.0, 0.0, 0.0])
    assert rewards.tolist()[0] == pytest.approx([-0.05, 0.0, 0.1 + 1.0])
    assert rewards.tolist()[1] == pytest.approx([-0.1, 2.0, 0.0])  # score at index 1: the padding gets none


def test_whiten_over_masked_entries():
    out = rlhf.whiten(torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0]))
    assert out.tolist() == pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-4)
    out = rlhf.whiten(torch.tensor([1.0, 2.0, 3.0, 4.0]), torch.ones(4))
    s = (5 / 3) ** 0.5
    assert out.tolist() == pytest.approx([-1.5 / s, -0.5 / s, 0.5 / s, 1.5 / s], abs=1e-4)


def test_gae_hand_computed():
    adv, ret = rlhf.gae(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, 1.0]]), torch.ones(1, 3), 1.0, 0.5)
    assert adv.tolist()[0] == pytest.approx([1.0, 0.0, -2.0])
    assert ret.tolist()[0] == pytest.approx([2.0, 2.0, 1.0])
    # padding: the value past the end counts as 0, padded positions get nothing
    adv, ret = rlhf.gae(torch.tensor([[1.0, 2.0, 9.0]]), torch.tensor([[0.0, 1.0, 0.0]]),
                        torch.tensor([[1, 1, 0]]), 1.0, 1.0)
    assert adv.tolist()[0] == pytest.approx([0.0, -1.0, 0.0]) and ret.tolist()[0] == pytest.approx([1.0, 1.0, 0.0])
    adv, _ = rlhf.gae(torch.tensor([[1.0, 2.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2), 0.5, 1.0)
    assert adv.tolist()[0] == pytest.approx([0.5, -1.0])


def test_policy_loss_at_and_beyond_the_clip_boundaries():
    ratio = torch.tensor([[1.5, 0.5, 1.1, 1.2, 0.5]])
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0, -1.0]])
    loss, stats = rlhf.policy_loss(torch.log(ratio), torch.zeros(1, 5), adv, torch.ones(1, 5), 0.2)
    # per token max(-A r, -A clip(r)): -1.2 (clipped), -0.5, 1.1, -1.2 (at the boundary: not clipped), 0.8 (clipped)
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 1.1 - 1.2 + 0.8) / 5)
    assert stats["clipfrac"] == pytest.approx(2 / 5)
    # beyond the boundary the gradient is zero; inside, it is -A * r
    lp = torch.log(ratio).requires_grad_(True)
    rlhf.policy_loss(lp, torch.zeros(1, 5), adv, torch.ones(1, 5), 0.2)[0].backward()
    assert lp.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 5, 1.1 / 5, -1.2 / 5, 0.0])


def test_value_loss_clipped():
    loss, stats = rlhf.value_loss(torch.tensor([[1.5, 0.9]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]]),
                                  torch.ones(1, 2), 0.2)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2) and stats["vf_clipfrac"] == 0.5


def test_adaptive_kl_controller():
    c = rlhf.AdaptiveKLController(0.1, target=6.0, horizon=10000)
    assert c.update(12.0, 1000) == pytest.approx(0.1 * 1.02)  # error clipped at +20 %
    assert c.update(3.0, 1000) == pytest.approx(0.1 * 1.02 * 0.98)  # clipped at -20 %
    assert c.update(6.6, 1000) == pytest.approx(0.1 * 1.02 * 0.98 * 1.01)
    assert rlhf.FixedKLController(0.02).update(100.0, 1000) == 0.02


def test_adaptive_kl_controller_with_a_floor_is_a_budget():
    c = rlhf.AdaptiveKLController(0.05, target=6.0, horizon=8, floor=0.05)
    assert c.update(1.0, 8) == 0.05  # far below the target: stays at the floor, not 0.05 * 0.8
    assert c.update(12.0, 8) == pytest.approx(0.05 * 1.2)  # over it: up by at most 20 % a horizon
    assert c.update(12.0, 8) == pytest.approx(0.05 * 1.2 * 1.2)
    assert c.update(6.6, 4) == pytest.approx(0.05 * 1.44 * 1.05)  # half a horizon, 10 % over
    for _ in range(20):
        c.update(0.0, 8)
    assert c.value == 0.05  # back to the floor, never below


def test_kl_to_reference_by_hand():
    ref = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])  # p_ref = (1/2, 1/2) and (3/4, 1/4)
    pol = torch.tensor([[math.log(3.0), 0.0], [math.log(3.0), 0.0]])  # p = (3/4, 1/4) twice
    kl_first = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert rlhf.kl_to_reference(pol, ref).item() == pytest.approx(kl_first / 2, abs=1e-6)
    same = torch.randn(5, 7, requires_grad=True)
    loss = rlhf.kl_to_reference(same, same.detach())
    loss.backward()
    assert loss.item() == pytest.approx(0.0, abs=1e-6) and same.grad.abs().max() < 1e-6  # no pull at the start


def test_clip_grad_norms_clips_each_group_on_its_own():
    a, b = torch.zeros(2, requires_grad=True), torch.zeros(3, requires_grad=True)
    a.grad, b.grad = torch.tensor([0.3, 0.4]), torch.tensor([0.0, 60.0, 80.0])
    norms = rlhf.clip_grad_norms([[a], [b]], 1.0)
    assert norms == pytest.approx([0.5, 100.0])
    assert torch.allclose(a.grad, torch.tensor([0.3, 0.4]))  # a huge value gradient leaves the policy's alone
    assert b.grad.norm().item() == pytest.approx(1.0, rel=1e-4)


def test_score_features_mean_over_the_response_so_far_by_hand():
    from instructcli.models import score_features

    h = torch.tensor([[[1.0, 0.0], [2.0, 0.0], [3.0, 1.0], [5.0, 3.0]]])  # (1, 4, 2), response from position 2
    mask = torch.ones(1, 4)
    f = score_features(h, mask, torch.tensor([2]), "mean")
    assert torch.equal(f[..., :2], h)
    assert torch.allclose(f[0, :, 2:], torch.tensor([[0.0, 0.0], [0.0, 0.0], [3.0, 1.0], [4.0, 2.0]]))
    pad = score_features(h, torch.tensor([[1.0, 1.0, 1.0, 0.0]]), torch.tensor([1]), "mean")  # last is padding
    assert torch.allclose(pad[0, 2, 2:], torch.tensor([2.5, 0.5]))
    assert score_features(h, mask, None, "last") is h
