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
