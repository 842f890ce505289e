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
    return nll_sum(logits.reshape(-1, logits.size(-1)), targets.reshape(-1)), int((targets != IGNORE_INDEX).sum())


def nll_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy of (N, V) logits against (N,) targets; IGNORE_INDEX targets count nothing."""
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX, reduction="sum")


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
    better, diff = _ordered_pairs(rewards, ranks)
    hits, pairs = _hits(better, diff)
    per_prompt = (-F.logsigmoid(diff) * better).sum((1, 2)) / pairs.clamp(min=1)
    n = pairs.sum()
    return per_prompt[pairs > 0].mean(), hits.sum() / n.clamp(min=1), n


def pair_hits(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per prompt (as ranking_loss's inputs): how many of its ordered pairs the rewards order as the ranks do
    (the better one strictly higher), and how many ordered pairs it has; (B,), (B,)."""
    return _hits(*_ordered_pairs(rewards, ranks))


def _ordered_pairs(rewards: torch.Tensor, ranks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K, K): whether response i is ranked above response j (ties and padding make no pair), and r_i - r_j."""
    valid = ranks > 0
    better = (ranks[:, :, None] < ranks[:, None, :]) & valid[:, :, None] & valid[:, None, :]
    return better, rewards[:, :, None] - rewards[:, None, :]


def _hits(better: torch.Tensor, diff: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ((diff > 0) & better).sum((1, 2)), better.sum((1, 2))


# ------------------------------------------------------------------------------------------- sampling
def top_p_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """softmax(logits / temperature) restricted to the smallest set of tokens whose mass reaches top_p (the
    most likely token always stays), renormalised; (B, V) -> (B, V)."""
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    drop = sorted_p.cumsum(-1) - sorted_p >= top_p  # the mass before a token already reached top_p
    sorted_p = sorted_p.masked_fill(drop, 0.0)
    probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
    return probs / probs.sum(-1, keepdim=True)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """One token per row: greedy at temperature 0, else drawn from top_p_probs; (B, V) -> (B,)."""
    if temperature <= 0:
        return logits.argmax(-1)
    return sample_from(top_p_probs(logits, temperature, top_p))


def sample_from(probs: torch.Tensor) -> torch.Tensor:
    """One index per row of (B, V) probabilities, by inverting the CDF: one uniform number per row, where
    torch.multinomial draws one per vocabulary entry (5x slower on a 49k vocabulary on CPU, every decode step).
    The CDF is summed in float64, so a token's chance is its probability to ~1e-12; zero-probability tokens
    are never drawn."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(probs.shape[0], 1, dtype=torch.float64, device=probs.device) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).clamp(max=probs.shape[1] - 1).squeeze(1)


# ------------------------------------------------------------------------------------------------ PPO
def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under each position's logits; logits (B, T, V), tokens (B, T) -> (B, T)."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim=None) -> torch.Tensor:
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, reduce=lambda t: t) -> torch.Tensor:
    """(x - mean) / std over the masked entries (unbiased variance, as lm-human-preferences). `reduce` sums a
    tensor over data-parallel processes, so that mean and std are the global batch's."""
    mask = mask.to(x.dtype)
    total, count = reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    mean = total / count.clamp(min=1)
    n = count.clamp(min=2)
    var = reduce(((x - mean) ** 2 * mask).sum()) / count.clamp(min=1) * n / (n - 1)
    out = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        out = out + mean
    return out * mask


def compute_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                    mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token rewards: -kl_coef * (logprobs - ref_logprobs) at every response token, plus the score at the
    last real token of each response. Returns (rewards, per-token kl); both zero on padding."""
    kl = (logprobs - ref_logprobs) * mask
    rewards = -kl_coef * kl
    last = last_token_index(mask)
    rewards[torch.arange(len(scores)), last] += scores
    return rewards * mask, kl


def gae(values: torch.Tensor, rewards: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over response tokens (right padding; mask 0 after the end).

    delta_t = r_t + gamma * V_{t+1} - V_t, A_t = delta_t + gamma * lam * A_{t+1}, V past the end = 0.
    Returns (advantages, returns = advantages + values)."""
    values, rewards = values * mask, rewards * mask
    T = rewards.size(1)
    adv = torch.zeros_like(rewards)
    last = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(T)):
        next_v = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_v - values[:, t]
        last = (delta + gamma * lam * last) * mask[:, t]
        adv[:, t] = last
    return adv, (adv + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict]:
    """PPO clipped surrogate, averaged over response tokens; with clipfrac and approx_kl (k3) for the logs."""
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    stats = {"clipfrac": masked_mean((clipped > unclipped).float(), mask).item(),
             "approx_kl": masked_mean((ratio - 1) - log_ratio, mask).item()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               cliprange_value: float) -> tuple[torch.Tensor, dict]:
    """Clipped value loss: 0.5 * max((V - R)^2, (V_clipped - R)^2), V_clipped within cliprange_value of the old."""
    clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    l1, l2 = (values - returns) ** 2, (clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(l1, l2), mask)
    return loss, {"vf_clipfrac": masked_mean((l2 > l1).float(), mask).item()}


def kl_to_reference(logits: torch.Tensor, ref_logits: torch.Tensor) -> torch.Tensor:
    """Mean over the N positions of KL(p_ref || p) between (N, V) next-token logits: PPO-ptx's pretraining
    term. It is the LM loss on text drawn from the reference model, minus that text's entropy
    (E_{x~p_ref}[-log p(x)] = KL(p_ref || p) + H(p_ref)), so it is 0, with a zero gradient, while the policy
    predicts the pretraining text as the SFT model does, and grows only as it drifts."""
    return tempered_kl(ref_logits, logits, 1.0).mean()


def clip_grad_norms(groups: list[list[torch.Tensor]], max_norm: float) -> list[float]:
    """Clip each group of parameters' gradient to max_norm on its own; returns each group's norm before."""
    return [torch.nn.utils.clip_grad_norm_(g, max_norm).item() if g else 0.0 for g in groups]


def tempered_kl(logits: torch.Tensor, ref_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(p_T || ref_T) at each position of (..., V) next-token logits, both distributions at `temperature`
    (softmax of logits / T). Summed over a response's positions it is the KL, at T, along that response: what
    `instruct eval` reports for answers drawn at T, but read from the full distributions, so responses drawn at
    another temperature (PPO's rollouts) measure it too."""
    logp = F.log_softmax(logits.float() / temperature, -1)
    ref_logp = F.log_softmax(ref_logits.float() / temperature, -1)
    return (logp.exp() * (logp - ref_logp)).sum(-1)


KL_BUDGET_WINDOW = 3  # steps whose KL ppo --stop-kl averages


def kl_budget_spent(history: list[float], budget: float, window: int = KL_BUDGET_WINDOW) -> bool:
    """Whether the KL (nats per response, one figure per step), averaged over the last `window` steps, has
    reached `budget`: the mean, because one step's KL over a few rollouts is noisy."""
    return budget > 0 and len(history) >= window and sum(history[-window:]) / window >= budget


class AdaptiveKLController:
    """Ziegler et al. (2019): move kl_coef toward a target KL, proportional error clipped to +-20 % (per horizon
    of rollouts). `floor`: kl_coef never goes below it, so the target acts as a budget: the penalty rises while
    the KL is over it and returns to the floor, instead of falling early in a run, while the KL is still far below
    the target, and leaving the policy free to run past it."""

    def __init__(self, init_kl_coef: float, target: float, horizon: int, floor: float = 0.0):
        self.value, self.target, self.horizon, self.floor = init_kl_coef, target, horizon, floor

    def update(self, current_kl: float, n_steps: int) -> float:
        error = min(max(current_kl / self.target - 1, -0.2), 0.2)
        self.value = max(self.floor, self.value * (1 + error * n_steps / self.horizon))
        return self.value


class FixedKLController:
    def __init__(self, kl_coef: float):
        self.value = kl_coef

    def update(self, current_kl: float, n_steps: int) -> float:
        return self.value
