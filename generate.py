"""Batched generation with a KV cache, split as gpt-fast's generate.py is: prefill, decode_one_token, sample.

    prefill           the left-padded prompts through Transformer.forward, filling the cache
    decode_one_token  one new token per row through Transformer.decode, forward's fast twin
    sample            the next tokens from the logits: greedy, or temperature and top-p

Rows that reach a stop token leave the batch (KVCache.keep), so long answers decode alone.
`fast=False` decodes with Transformer.forward instead, the plain reference the tests compare with.

    python generate.py --prompt "What is the capital of France?"    # also: python model.py or chat.py ...
"""

import torch

from model import KVCache, left_pad


PREFILL_PADDING = 0.1  # prompts are prefilled together while padding is at most this share of their tokens


def length_groups(lengths, padding=PREFILL_PADDING):
    """Row indices grouped by length, longest first: a group takes the next rows as long as its
    padding (to its longest row) stays at most `padding` of its tokens."""
    groups = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        if groups:
            group = groups[-1]
            padded = (len(group) + 1) * lengths[group[0]]  # every row padded to the group's longest
            if padded <= (1 + padding) * (sum(lengths[j] for j in group) + lengths[i]):
                group.append(i)
                continue
        groups.append([i])
    return groups


def prefill(model, ids, mask, cache):
    """ids, mask (B, T), left-padded -> logits (B, vocab) at each prompt's last token; the cache then
    holds all T columns. Prompts of similar lengths run together and the others apart (length_groups),
    each group into a cache of its own that is then copied into its rows: a batch of 16 ARC prompts
    run as one is a third to a half padding."""
    B, T = ids.shape
    lengths = mask.sum(1).tolist()
    logits = [None] * B
    for group in length_groups(lengths):
        n = max(lengths[group[0]], 1)
        rows = torch.tensor(group, device=ids.device)
        part = KVCache(model.config, len(group), n, cache.k[0].dtype, ids.device)
        for i, row_logits in zip(group, model(ids[rows, T - n:], mask[rows, T - n:], part, logits_from=-1)[:, -1]):
            logits[i] = row_logits
        cache.put(rows, T - n, part)
    cache.length = T
    return torch.stack(logits)  # (B, vocab)


def decode_one_token(model, tokens, cache, fast=True):
    """tokens (B,) -> logits (B, vocab) of the token after each; the cache grows by one column."""
    return model.decode(tokens, cache) if fast else model(tokens[:, None], None, cache)[:, -1]


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    """logits (B, vocab) -> next tokens (B,). Greedy at temperature 0, else nucleus sampling."""
    if temperature <= 0:  # max's indices are argmax's (the first of equal maxima), 4 times as fast here
        return logits.max(-1).indices
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = nucleus(probs, top_p)
    return draw(probs, generator)


def nucleus(probs, top_p):
    """probs (B, V) with every token outside the row's nucleus set to 0: the nucleus is the smallest
    set of most probable tokens whose mass reaches top_p.

    The candidates are the k most probable tokens (topk, descending), k growing fourfold until each
    row's candidates hold more than top_p: 0.2 ms a row for 64 candidates against 4 ms for sorting
    all 49152 (RESULTS.md, "Speed"). nucleus_by_sort is the plain reference."""
    V = probs.shape[-1]
    k = min(64, V)
    while True:
        p, idx = probs.topk(k, dim=-1)  # (B, k), descending
        mass = p.cumsum(-1)  # (B, k)
        if k == V or bool((mass[:, -1] > top_p).all()):  # the (k+1)-th token is out of every nucleus
            break
        k = min(4 * k, V)
    keep = mass - p <= top_p  # a token is in while the mass before it has not reached top_p
    return torch.zeros_like(probs).scatter_(-1, idx, p * keep)


def nucleus_by_sort(probs, top_p):
    """nucleus's plain reference: all V tokens sorted, the same rule."""
    p, idx = probs.sort(dim=-1, descending=True)
    keep = p.cumsum(-1) - p <= top_p
    return torch.zeros_like(probs).scatter_(-1, idx, p * keep)


def draw(probs, generator=None):
    """One token per row of probs (B, V), token i with probability probs[i] / sum(probs): inverse
    transform sampling, the first token whose running sum exceeds u * sum for a uniform u in [0, 1).

    torch.multinomial draws from the same distribution, but on the CPU it draws one exponential
    variate per token of the vocabulary: 1 ms a row, 17 ms a step at 16 rows, a fifth of a
    decoding step (RESULTS.md, "Speed"). This is one uniform number and a running sum per row,
    0.1 ms. In float32 the running sum of a 49152-way softmax is within 4e-8 of float64's, so no
    token's chance moves by more than that; a token of probability 0 is never drawn."""
    cdf = probs.cumsum(-1)  # (B, V), nondecreasing
    total = cdf[:, -1:]  # (B, 1)
    u = torch.rand(total.shape, generator=generator, device=probs.device) * total
    u = torch.minimum(u, total.nextafter(torch.zeros_like(total)))  # below total, even after rounding
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)  # first i with cdf[i] > u: probs[i] > 0


@torch.inference_mode()
def generate(model, prompts, max_new_tokens, temperature=0.0, top_p=1.0, stop_tokens=(),
             pad_id=0, generator=None, fast=True, samples=1, keep_stop=False):
    """Batched generation with a KV cache. prompts: list of token lists.

    Returns the new tokens of each prompt, up to and excluding the first stop token (`keep_stop`:
    including it, where the answer stopped; REINFORCE scores the decision to stop as any other token).
    `samples` K > 1: K answers to each prompt, prompt after prompt (K * len(prompts) lists), from one
    prefill per prompt whose cache rows are then copied K times; sampling draws each row apart.
    """
    device = model.inv_freq.device
    ids, mask = left_pad(prompts, pad_id, device)
    B, T = ids.shape
    cache = KVCache(model.config, B, T + max_new_tokens, model.model.embed_tokens.weight.dtype, device)
    stop = set(stop_tokens)
    logits = prefill(model, ids, mask, cache)
    if samples > 1:  # one prefill per prompt: its cache rows and next-token logits, K times each
        copies = torch.arange(B, device=device).repeat_interleave(samples)  # (B * K,): 0, 0, .., 1, 1, ..
        cache.keep(copies)
        logits, B = logits[copies], B * samples
    rows = list(range(B))  # which answer each row of the shrinking batch belongs to
    out = [[] for _ in range(B)]
    for _ in range(max_new_tokens):
        nxt = sample(logits, temperature, top_p, generator)  # (b,) for the b rows still generating
        tokens = nxt.tolist()
        going = [i for i, t in enumerate(tokens) if t not in stop]
        for i, t in enumerate(tokens):
            if t not in stop or keep_stop:
                out[rows[i]].append(t)
        if not going:
            break
        if len(going) < len(rows):  # finished rows leave the batch, so the long answers decode alone
            keep = torch.tensor(going, device=device)
            cache.keep(keep)
            rows, nxt = [rows[i] for i in going], nxt[keep]
        logits = decode_one_token(model, nxt, cache, fast)
    return out



if __name__ == "__main__":
    # `python generate.py --prompt ...`: chat.py's command line, run as a script (runpy), not
    # imported, so that this file depends on nothing above it (chat.py imports generate.py)
    import runpy
    runpy.run_module("chat", run_name="__main__")
