"""Forwards without a KV cache, each computing only what its caller needs: hidden states (after some or all
layers), logits on a slice or at the labelled positions, the LM loss, response log-probs, a head's features."""

from __future__ import annotations

import contextlib
import inspect

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


def hidden_states(model, input_ids, attention_mask, position_ids=None, layers: int = 0,
                  adapter_names: list[str] | None = None) -> torch.Tensor:
    """The decoder's last hidden states of a causal LM (PEFT-wrapped or not; its active adapters apply), with
    no KV cache: for the heads that run only where they are needed (LM head, score head, value head).
    `layers` > 0: the states after that many decoder layers (then the final norm); the layers above never run.
    `adapter_names`: one peft adapter per row (a mixed-adapter batch).

    Where every row begins with the same tokens at the same positions (a chat template's system prompt: 24 of
    a SmolLM2 prompt's ~62 tokens), that prefix runs once per adapter and the rows attend to its keys and values
    (shared_prefix): the same hidden states, gradients included, for a fifth less arithmetic."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    decoder = base.get_decoder()
    # without position ids the decoder numbers the columns from 0: made explicit so a prefix can be checked
    pos = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids) if position_ids is None \
        else position_ids
    k = shared_prefix(input_ids, attention_mask, pos) if _cacheable(base) else 0

    def run(names, **kw):
        hooks = model._enable_peft_forward_hooks(adapter_names=names) if names else contextlib.nullcontext()
        with hooks:
            return decoder(**kw).last_hidden_state

    with _first_layers(decoder, layers):
        if not k:
            return run(adapter_names, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=False)
        b, t = input_ids.shape
        cols = _prefix_columns(attention_mask, k)
        in_prefix = torch.zeros_like(attention_mask, dtype=torch.bool)
        in_prefix[torch.arange(b, device=cols.device)[:, None], cols] = True
        # the prefix once per distinct adapter; each row then reads its adapter's copy from the cache
        names = list(dict.fromkeys(adapter_names)) if adapter_names else None
        which = torch.tensor([names.index(n) for n in adapter_names] if names else [0] * b, device=cols.device)
        rows = len(names) if names else 1
        from transformers import DynamicCache

        kv = DynamicCache(config=base.config)
        cache = {_cache_kw(decoder): kv}  # the argument's name looked up once for both calls
        head = run(names, input_ids=input_ids[0, cols[0]].expand(rows, k),
                   attention_mask=attention_mask.new_ones(rows, k), position_ids=pos[0, cols[0]].expand(rows, k),
                   use_cache=True, **cache)
        kv.batch_select_indices(which)
        keep = ~in_prefix
        tail = run(adapter_names, input_ids=input_ids[keep].view(b, t - k),
                   attention_mask=torch.cat([attention_mask.new_ones(b, k), attention_mask[keep].view(b, t - k)], 1),
                   position_ids=pos[keep].view(b, t - k), use_cache=True, **cache)
        out = tail.new_zeros(b, t, tail.shape[-1])
        out[keep] = tail.reshape(-1, tail.shape[-1])
        out[in_prefix] = head[which].reshape(-1, head.shape[-1])
        return out


PREFIX_MIN = 8  # a shorter shared prefix does not pay for the second decoder call


def shared_prefix(ids, attention_mask, position_ids) -> int:
    """How many leading real tokens all rows share: the same tokens at the same positions, starting at each row's
    first real column (prompts may be left-padded), leaving each row at least one token of its own. 0 when fewer
    than PREFIX_MIN, or for a single row."""
    b = ids.shape[0]
    if b < 2:
        return 0
    limit = int(attention_mask.sum(1).min()) - 1
    if limit < PREFIX_MIN:
        return 0
    cols = _prefix_columns(attention_mask, limit)
    toks, pos, real = (x.gather(1, cols) for x in (ids, position_ids, attention_mask))
    same = (toks == toks[:1]).all(0) & (pos == pos[:1]).all(0) & (real != 0).all(0)
    k = int(same.long().cumprod(0).sum())
    return k if k >= PREFIX_MIN else 0


def _prefix_columns(attention_mask, n: int) -> torch.Tensor:
    """(B, n): the columns of each row's first n real tokens (real tokens are contiguous; prompts may be
    left-padded)."""
    first = attention_mask.long().argmax(1)
    return first[:, None] + torch.arange(n, device=attention_mask.device)


def _cacheable(base) -> bool:
    """Decoders known to take a DynamicCache the standard way (the PLAIN_LM_HEAD families), and not
    checkpointing activations (which turns the cache off in training)."""
    checkpointing = getattr(base, "is_activation_checkpointing", None)  # the name from transformers 5.2x
    if checkpointing is None:
        checkpointing = getattr(base, "is_gradient_checkpointing", False)
    return getattr(base.config, "model_type", None) in PLAIN_LM_HEAD and not checkpointing


def _cache_kw(decoder) -> str:
    """The decoder's name for a KV cache argument: `cache` from transformers 5.25, `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(decoder.forward).parameters else "past_key_values"


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
