"""Token id lists into padded tensors: right-padded sequences with their LM labels, left-padded prompts for
generation, prompt + response rollouts, and chunks of similar length."""

from __future__ import annotations

import torch

from instructcli.tokens import IGNORE_INDEX


def pad(seqs: list[list[int]], value: int, side: str = "right") -> list[list[int]]:
    n = max(len(s) for s in seqs)
    return [s + [value] * (n - len(s)) if side == "right" else [value] * (n - len(s)) + s for s in seqs]


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int):
    """Right-padded LM batch: input_ids, attention_mask, labels (padding ignored)."""
    return {**collate_sequences([b[0] for b in batch], pad_id),
            "labels": torch.tensor(pad([b[1] for b in batch], IGNORE_INDEX))}


def collate_sequences(seqs: list[list[int]], pad_id: int, side: str = "right"):
    """input_ids + attention_mask. Left padding for generation, so every row's next token is in the last column."""
    return {
        "input_ids": torch.tensor(pad(seqs, pad_id, side)),
        "attention_mask": torch.tensor(pad([[1] * len(s) for s in seqs], 0, side)),
    }


def collate_prompts(prompts: list[list[int]], pad_id: int):
    return collate_sequences(prompts, pad_id, "left")


def collate_rollout(queries: list[list[int]], responses: list[list[int]], pad_id: int, device: str = "cpu"):
    """Prompt + response batch, prompts left-padded and responses right-padded, so every response starts at
    column P. Returns (input_ids, attention_mask, position_ids, P) on `device`; an empty response is one
    masked pad."""
    q = collate_prompts(queries, pad_id)
    r = collate_sequences([x or [pad_id] for x in responses], pad_id)
    r["attention_mask"][[i for i, x in enumerate(responses) if not x], 0] = 0
    ids = torch.cat([q["input_ids"], r["input_ids"]], 1).to(device)
    attn = torch.cat([q["attention_mask"], r["attention_mask"]], 1).to(device)
    return ids, attn, (attn.cumsum(-1) - 1).clamp(min=0), q["input_ids"].shape[1]


def length_chunks(lengths: list[int], size: int) -> list[list[int]]:
    """Indices in order of length, `size` at a time: batches that waste little on padding."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    return [order[i:i + size] for i in range(0, len(order), size)]
