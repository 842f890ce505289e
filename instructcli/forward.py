"""Forwards without a KV cache, each computing only what its caller needs: hidden states (after some or all
layers), logits on a slice or at the labelled positions, the LM loss, response log-probs, a head's features."""

from __future__ import annotations

import contextlib

import torch

from instructcli import batches, rlhf


# Families whose logits are exactly lm_head(final hidden state): no scaling or soft-capping after the head
# (Granite divides, Gemma 2 caps, Cohere scales). Others take the full forward.
PLAIN_LM_HEAD = {"llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "phi3", "olmo",
                 "olmo2", "smollm3", "gemma"}


def labelled_logits(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, V) logits at the N positions that predict a label, and those N targets. The LM head is applied only
    there: SFT's prompt tokens and padding never get vocab-wide logits (on a 49k vocab, the costliest matmul)."""
    targets = rlhf.shift_labels(labels)
    where = targets != rlhf.IGNORE_INDEX
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_LM_HEAD:
        logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[where]
    else:
        hidden = hidden_states(model, input_ids, attention_mask)
        logits = model.get_output_embeddings()(hidden[where])  # LoRA on the head, if any, included
    return logits, targets[where]


def lm_loss_sum(model, input_ids, attention_mask, labels) -> tuple[torch.Tensor, int]:
    """rlhf.lm_loss_sum(model(...).logits, labels), computed through labelled_logits."""
    logits, targets = labelled_logits(model, input_ids, attention_mask, labels)
    return rlhf.nll_sum(logits, targets), len(targets)


def logits_from(model, ids, attention_mask, position_ids, start: int) -> torch.Tensor:
    """model(...).logits[:, start:], the LM head applied only from column `start` on. The head gets a
    contiguous input: transformers' own slice (logits_to_keep) is a strided view, which makes the head a
    batched matmul over a broadcast weight, 2x slower on CPU."""
    if getattr(getattr(model, "config", None), "model_type", None) not in PLAIN_LM_HEAD:
        return model(input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                     logits_to_keep=ids.shape[1] - start).logits
    hidden = hidden_states(model, ids, attention_mask, position_ids)
    return model.get_output_embeddings()(hidden[:, start:].contiguous())


def hidden_states(model, input_ids, attention_mask, position_ids=None, layers: int = 0) -> torch.Tensor:
    """The decoder's last hidden states of a causal LM (PEFT-wrapped or not; its active adapters apply), with
    no KV cache: for the heads that run only where they are needed (LM head, score head, value head).
    `layers` > 0: the states after that many decoder layers (then the final norm); the layers above never run."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    with _first_layers(decoder, layers):
        return decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False).last_hidden_state


@contextlib.contextmanager
def _first_layers(decoder, n: int):
    """The decoder runs only its first n layers inside the block (0 = all). The shared base is restored on exit,
    so the policy, whose forwards use every layer, never sees it cut."""
    if not n:
        yield
        return
    every = decoder.layers
    decoder.layers = torch.nn.ModuleList(list(every)[:n])
    try:
        yield
    finally:
        decoder.layers = every


def response_logprobs(model, queries: list[list[int]], responses: list[list[int]], pad_id: int, device: str,
                      batch_size: int = 8, temperature: float = 1.0) -> list[torch.Tensor]:
    """log p(response token | prompt, earlier tokens) for each (prompt, response) pair, under the model's
    distribution at `temperature`: one 1-D CPU tensor per response. Logits are computed only at the response
    positions (`logits_to_keep`), never the prompt's."""
    out: list[torch.Tensor] = []
    with torch.no_grad():
        for b in range(0, len(queries), batch_size):
            rs = responses[b:b + batch_size]
            ids, attn, pos, start = batches.collate_rollout(queries[b:b + batch_size], rs, pad_id, device)
            logits = logits_from(model, ids, attn, pos, start - 1)[:, :-1].float() / temperature
            lp = rlhf.logprobs_from_logits(logits, ids[:, start:]).cpu()
            out += [lp[i, :len(r)] for i, r in enumerate(rs)]
    return out


def score_features(hidden, attention_mask, starts, pool: str) -> torch.Tensor:
    """(B, T, F) features a score or value head reads at each position t: the hidden state h_t, and with pool
    "mean" also the mean of h over the response's positions up to t (0 before the response starts), F = 2H.
    At a sequence's last token that is the whole response's mean; at an earlier position, the mean of the
    prefix so far, so a value head copied from the score head starts as the RM's score of each prefix."""
    if pool == "last":
        return hidden
    pos = torch.arange(hidden.size(1), device=hidden.device)
    resp = ((pos[None, :] >= starts[:, None]) & attention_mask.bool()).to(hidden.dtype)
    total = (hidden * resp[..., None]).cumsum(1)
    mean = total / resp.cumsum(1).clamp(min=1)[..., None]
    return torch.cat([hidden, mean], -1)
