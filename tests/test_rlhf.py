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


def test_last_token_index_left_and_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert rlhf.last_token_index(mask).tolist() == [2, 4, 4, 0]


def test_non_finite_guard_skips_and_aborts():
    from instructcli.console import NonFiniteGuard
    from instructcli.errors import InstructError

    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=1.0)
    guard = NonFiniteGuard(limit=2)
    assert guard.ok(1, 0.5, 1.0, opt)
    p.grad = torch.ones(2)
    assert not guard.ok(2, float("nan"), 1.0, opt) and p.grad is None  # the bad step's gradient is dropped
    assert guard.ok(3, 0.4, 2.0, opt) and guard.in_a_row == 0
    assert not guard.ok(4, 0.4, float("inf"), opt)
    with pytest.raises(InstructError, match="2 non-finite steps in a row") as e:
        guard.ok(5, float("-inf"), 1.0, opt)
    assert e.value.exit_code == 1
