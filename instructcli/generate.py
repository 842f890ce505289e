"""The sampling loop: K samples per prompt over an in-place KV cache, rows leaving the batch when done."""

from __future__ import annotations

import torch

from instructcli import batches, console, data, rlhf, static_decode, tokens
from instructcli.decode_cpu import decode_linears


def generate(model, tok, prompt_ids: list[list[int]], n: int, temperature: float, top_p: float,
             max_new_tokens: int, device: str, logprobs: bool = False, on_token=None, decode: str = "eager",
             keep_logits: bool = False):
    """Sample with a KV cache; per prompt, n lists of new token ids, each cut after its first stop token (EOS
    or the chat template's end-of-turn, kept: stopping is one of the policy's actions).

    With `logprobs`, also returns two (prompts x n, longest answer) float tensors, rows in output order and 0
    past each answer's end: log p(token) and the entropy, both of softmax(logits / temperature) before top-p,
    which is the distribution PPO's ratio and KL penalty are taken under. With `keep_logits` too (eager only),
    a third: the (prompts x n, longest answer, vocabulary) float32 logits each token was drawn from, 0 past each
    answer's end, so PPO reads its KL budget from them instead of forwarding the policy again.

    Our own loop rather than `model.generate`, for these reasons. Each prompt is forwarded once and its cache
    copied for its n samples. A row that has emitted EOS leaves the batch, so the others decode with less
    work (answers' lengths vary a lot). It samples from exactly softmax(logits / temperature) with top-p,
    which PPO's log-probs assume, whatever the model's generation_config adds (repetition penalties, top-k).
    And decoding costs less: the KV cache grows in place (_preallocate), and on CPU the linear layers take
    their decode form (decode_linears).

    `decode`: eager (this loop), static (static_decode: a static KV cache, its step a replayed CUDA graph on
    CUDA), auto (static on CUDA, eager elsewhere). Streaming (`on_token`) is always eager.
    """
    assert logprobs or not keep_logits, "keep_logits comes with logprobs"
    if on_token is None and static(decode, device):
        assert not keep_logits, "keep_logits: the eager loop only"
        return static_decode.generate(model, tok, prompt_ids, n, temperature, top_p, max_new_tokens, device,
                                      logprobs)
    batch = batches.collate_prompts(prompt_ids, tok.pad_token_id)  # left-padded: each row's last token is last
    attn = batch["attention_mask"].to(device)
    pos = (attn.cumsum(1) - 1).clamp(min=0)
    out = [[] for _ in range(len(prompt_ids) * n)]
    ids = batch["input_ids"].to(device)
    rows = torch.arange(len(prompt_ids), device=device).repeat_interleave(n)  # batch row -> prompt
    kv = _cache_name(model)
    stop = torch.tensor(tokens.stop_token_ids(tok), device=device)
    with torch.no_grad(), decode_linears(model):
        step = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache = step[kv]
        shrink = _indexable(cache)  # False: a cache type we cannot index, so finished rows stay
        if shrink:
            if n > 1:  # each prompt's cache, copied for its samples
                _select_rows(cache, rows)
            logits = step.logits[rows, -1]
        else:
            if n > 1:  # each sample forwards its prompt
                step = model(input_ids=ids[rows], attention_mask=attn[rows], position_ids=pos[rows], use_cache=True,
                             logits_to_keep=1)
                cache = step[kv]
            logits = step.logits[:, -1]
        if shrink:
            _preallocate(cache, max_new_tokens)
        attn, next_pos = attn[rows], pos[rows, -1:] + 1
        rows = torch.arange(len(out), device=device)  # batch row -> output
        live = torch.ones(len(out), dtype=torch.bool, device=device)
        steps = []  # with logprobs: (rows, log p(token), entropy) per step
        kept = None  # with keep_logits: (outputs, max_new_tokens, vocabulary), filled step by step
        for t in range(max_new_tokens):
            picked = rlhf.sample_next(logits, temperature, top_p)
            if logprobs:
                lp = torch.log_softmax(logits.float() / temperature, -1)
                steps.append((rows, lp.gather(1, picked[:, None]).squeeze(1), -(lp.exp() * lp).sum(-1)))
                if keep_logits:
                    if kept is None:
                        kept = torch.zeros(len(out), max_new_tokens, logits.shape[-1], device=device)
                    kept[rows, t] = logits.float()
            for r, x, alive in zip(rows.tolist(), picked.tolist(), live.tolist()):
                if alive:
                    out[r].append(x)
                    if on_token is not None:  # streaming (instruct chat): output row, its picked so far
                        on_token(r, out[r])
            live = live & ~torch.isin(picked, stop)
            if t == max_new_tokens - 1 or not live.any():
                break
            if shrink and not live.all():
                keep = live.nonzero().squeeze(1)
                _select_rows(cache, keep)
                rows, picked, attn, next_pos, live = rows[keep], picked[keep], attn[keep], next_pos[keep], live[keep]
            attn = torch.cat([attn, attn.new_ones(len(attn), 1)], 1)
            step = model(input_ids=picked[:, None], attention_mask=attn, position_ids=next_pos, use_cache=True,
                         **{kv: cache})
            logits, next_pos = step.logits[:, -1], next_pos + 1
    grouped = [out[i * n:(i + 1) * n] for i in range(len(prompt_ids))]
    if not logprobs:
        return grouped
    lp, ent = (torch.zeros(len(out), len(steps), device=device) for _ in range(2))
    for t, (r, x, e) in enumerate(steps):  # rows that ended at this step still hold their EOS's values
        lp[r, t], ent[r, t] = x, e
    ended = torch.tensor([len(x) for x in out], device=device)[:, None] <= torch.arange(len(steps), device=device)
    lp, ent = lp.masked_fill(ended, 0.0), ent.masked_fill(ended, 0.0)
    if keep_logits:  # in place: the tensor is the largest the loop makes
        return grouped, lp, ent, kept[:, :len(steps)].masked_fill_(ended[..., None], 0.0)
    return grouped, lp, ent


def static(decode: str, device: str) -> bool:
    """Whether --decode `decode` on `device` runs static_decode's loop rather than the eager one."""
    return decode == "static" or (decode == "auto" and str(device).startswith("cuda"))


def _cache_name(model) -> str:
    """The KV cache's name in forward() and its output: `cache` from transformers 5.2x, `past_key_values` before."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _indexable(cache) -> bool:
    """Whether every layer of the cache is a plain key/value store whose batch rows _select_rows can pick."""
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(x).__name__ in ("DynamicLayer", "DynamicSlidingWindowLayer") for x in layers)


def _preallocate(cache, room: int) -> None:
    """Let each plain layer of the cache append its next `room` tokens in place. DynamicLayer.update
    concatenates, copying the whole cache at every step, more as answers grow: 8 rows on CPU after 400 tokens,
    119 -> 112 ms per decode step (bench/rollout.py --decode-step). The layer's keys/values become views of the
    first n positions of a buffer with `room` more (_select_rows keeps rows of the buffer itself); a layer
    whose keys were replaced otherwise gets a new buffer on its next update."""
    import functools

    for layer in cache.layers:
        if type(layer).__name__ == "DynamicLayer" and "update" not in layer.__dict__:
            layer.update = functools.partial(_append_in_place, layer, room)


def _append_in_place(layer, room, key_states, value_states, *args, **kwargs):
    k, v = layer.keys, layer.values
    if k is None or not k.numel():  # nothing cached yet: the layer's own update initialises it
        return type(layer).update(layer, key_states, value_states, *args, **kwargs)
    n, m = k.shape[-2], key_states.shape[-2]
    buf = layer.__dict__.get("_instruct_buf")
    if buf is None or buf[0].data_ptr() != k.data_ptr() or buf[0].shape[0] != k.shape[0] or buf[0].shape[-2] < n + m:
        cap = n + max(room, m)  # the first append, a full buffer, or keys replaced by other code
        buf = tuple(t.new_empty(*t.shape[:-2], cap, t.shape[-1]) for t in (k, v))
        buf[0][..., :n, :], buf[1][..., :n, :] = k, v
        layer._instruct_buf = buf
    buf[0][..., n:n + m, :], buf[1][..., n:n + m, :] = key_states, value_states
    layer.keys, layer.values = buf[0][..., :n + m, :], buf[1][..., :n + m, :]
    return layer.keys, layer.values


def _select_rows(cache, index) -> None:
    """Keep (or repeat) the cache's batch rows `index`, layer by layer (an _indexable cache)."""
    for layer in cache.layers:
        if getattr(layer, "keys", None) is not None and layer.keys.numel():
            buf = layer.__dict__.get("_instruct_buf")
            if buf is not None and buf[0].data_ptr() == layer.keys.data_ptr():
                # a _preallocate buffer: select in it, so the old one is freed layer by layer (selecting only
                # the keys would hold every layer's old buffer until its next append, up to twice the cache)
                n = layer.keys.shape[-2]
                layer._instruct_buf = buf = (buf[0][index], buf[1][index])
                layer.keys, layer.values = buf[0][..., :n, :], buf[1][..., :n, :]
            else:
                layer.keys, layer.values = layer.keys[index], layer.values[index]


def sample_batches(model, tok, queries: list[list[int]], n: int, temperature: float, top_p: float,
                   max_new_tokens: int, batch_size: int, seed: int, device: str, decode: str = "eager"):
    """Yield (first prompt index, generate()'s output) batch by batch. Each batch is seeded on its own
    (seed + index), so a prompt's samples do not depend on the batches before it."""
    for b in range(0, len(queries), batch_size):
        torch.manual_seed(seed + b)
        yield b, generate(model, tok, queries[b:b + batch_size], n, temperature, top_p, max_new_tokens, device,
                          decode=decode)


def answer_prompts(model, tok, prompts: data.Loaded, n: int, cfg, seed: int, device: str, label: str):
    """Every prompt answered n times (the sampling flags of eval's or compare's `cfg`), with a progress bar;
    returns (prompt ids, generate()'s output per prompt)."""
    queries, cut = tokens.encode_prompts(tok, prompts, cfg.max_prompt_len)
    if cut:
        console.warn(f"{cut} prompts of {prompts.path} longer than --max-prompt-len kept their end")
    outs = []
    with console.Bar(len(queries), label) as bar:
        for _, batch in sample_batches(model, tok, queries, n, cfg.temperature, cfg.top_p,
                                    cfg.max_new_tokens, cfg.batch_size, seed, device, cfg.decode):
            outs += batch
            bar.update(len(batch))
    return queries, outs


def answer_texts(model, tok, prompts: data.Loaded, cfg, device: str, label: str) -> tuple[list[str], list[bool]]:
    """One answer per prompt as text (special tokens off, stripped), and whether each ended on its own (False:
    cut off at --max-new-tokens)."""
    return as_texts(tok, answer_prompts(model, tok, prompts, 1, cfg, cfg.seed, device, label)[1])


def as_texts(tok, outs) -> tuple[list[str], list[bool]]:
    """Each prompt's first answer of answer_prompts() as text (special tokens off, stripped), and whether it
    ended on its own."""
    return ([tok.decode(o[0], skip_special_tokens=True).strip() for o in outs],
            [tokens.ended(tok, o[0]) for o in outs])
