"""Pure tensor math of the recipe: no I/O, no models. Every function is tested with literal tensors."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets for next-token prediction: position t predicts labels[t + 1]; the last position has none."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def lm_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there are.

    Summing (then dividing by the token count of the whole accumulated step) weights every response token
    equally, however the examples fall into micro-batches.
    """
    targets = shift_labels(labels)
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def lr_lambda(step: int, total: int, warmup: int, schedule: str) -> float:
    """Learning-rate multiplier: linear warmup over `warmup` steps, then cosine/linear decay to 0, or constant."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of each row's last real token, under left or right padding."""
    width = attention_mask.size(1)
    return width - 1 - attention_mask.flip(-1).int().argmax(-1)


def ranking_loss(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's RM loss for a batch of prompts with K responses each (padded with rank 0).

    rewards, ranks: (B, K); rank 1 = best, equal ranks are ties (no pair), 0 = padding. Per prompt, the mean over
    its C(K,2) ordered pairs of -log sigmoid(r_better - r_worse); then the mean over prompts, so each prompt is
    one batch element whatever its K. Returns (loss, pairwise accuracy, number of pairs).
    """
    valid = ranks > 0
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    diff = rewards[:, :, None] - rewards[:, None, :]
    pairs = better.sum((1, 2))
    per_prompt = (-F.logsigmoid(diff) * better).sum((1, 2)) / pairs.clamp(min=1)
    n = pairs.sum()
    acc = ((diff > 0) & better).sum() / n.clamp(min=1)
    return per_prompt[pairs > 0].mean(), acc, n
