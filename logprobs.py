"""Log-probabilities of completions given their prompts, with gradients: what training and scoring need.

    logp, mask = token_logprobs(model, prompts, completions, pad_id)          # (B, L) each
    logp, mask, kl = token_logprobs(model, prompts, completions, pad_id, forward, kl=True)

reinforce.py's objectives (objectives.py) score rollouts and reference answers with it, cem.py its
candidates' tie-break, benchmarks/probe_arc.py the options of a question. The output head and
the log-softmax run together on chunks of tokens, recomputed in the backward pass, beside a plain
reference that holds the whole logits (tests/test_model.py checks that the two agree).
"""

import torch
import torch.utils.checkpoint

from model import left_pad


def kl_divergence(logits, base_logits):
    """KL(p || p_base) (...) of the next-token distributions softmax(logits) and softmax(base_logits) (..., vocab)."""
    logp, base = torch.log_softmax(logits.float(), -1), torch.log_softmax(base_logits.float(), -1)
    return (logp.exp() * (logp - base)).sum(-1)


LOGPROB_CHUNK = 256  # completion tokens per chunk in token_logprobs: (256, 49152) float32 logits are 50 MB


def token_logprobs(model, prompts, completions, pad_id=0, forward=None, return_logits=False, temperature=1.0,
                   kl=False, checkpoint=False):
    """Log-probabilities of each completion token given its prompt, with gradients enabled.

    prompts, completions: lists of token lists. Returns (logprobs (B, L), mask (B, L)) where L is the
    longest completion and mask marks real completion tokens. `forward` replaces model.__call__, e.g.
    a torch.func.functional_call with SVF weights (the output head is never an SVF target).
    `temperature`: the log-probabilities of the distribution that `sample` draws from at that
    temperature, log softmax(logits / T). kl=True appends kl (B, L), the KL penalty of reinforce.py:
    at each completion token, KL(p_forward || p_model) of the two next-token distributions at T = 1.

    The output head and the log-softmax run together on chunks of LOGPROB_CHUNK completion tokens,
    each chunk recomputed in the backward pass (torch.utils.checkpoint), so the logits (B, L, vocab)
    are never held whole (for 8 answers of 320 tokens they are 0.5 GB per copy, and the log-softmax
    and the backward pass make several), and padding goes through no head at all.
    return_logits=True is the plain reference, one pass that holds and also returns the logits
    (B, L, vocab); the tests check that both give the same values and gradients. checkpoint=True:
    the forward pass keeps no layer's activations for the backward pass (Transformer.forward).
    """
    forward = forward or model
    device = model.inv_freq.device
    L = max(max(len(c) for c in completions), 1)
    comp_mask = torch.zeros(len(prompts), L, dtype=torch.bool, device=device)
    for i, c in enumerate(completions):
        comp_mask[i, :len(c)] = True
    if return_logits or not comp_mask.any():  # the plain path (also when there is nothing to score)
        # left-pad the prompts and right-pad the completions so every completion starts at one column
        ids, mask = left_pad([p + c + [pad_id] * (L - len(c)) for p, c in zip(prompts, completions)], pad_id, device)
        P = ids.shape[1] - L  # column of the first completion token
        # (B, L, vocab): position t predicts t + 1
        logits = forward(ids, mask, logits_from=P - 1, checkpoint=checkpoint)[:, :-1]
        targets = ids[:, P:]  # (B, L)
        logp = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[..., None]).squeeze(-1)
        out = (logp * comp_mask, comp_mask, logits)
        if kl:
            with torch.no_grad():
                base_logits = model(ids, mask, logits_from=P - 1)[:, :-1]
            out += (kl_divergence(logits, base_logits) * comp_mask,)
        return out if return_logits else out[:2] + out[3:]

    # Whole sequences left-padded, so a batch of similar total lengths pads little: every completion
    # ends at the last column, and `ends` marks the positions that predict its tokens.
    ids, mask = left_pad([p + c for p, c in zip(prompts, completions)], pad_id, device)
    ends = comp_mask.flip(1)  # (B, L): the last len(c) of the L positions before the end
    start = ids.shape[1] - L - 1  # the position that predicts the first token of the longest completion

    def head(h, t, h_base=None):  # a chunk of n tokens: final hidden states (n, C), targets (n,)
        logits = model.lm_head(h).float()  # (n, vocab)
        scaled = logits / temperature if temperature != 1 else logits
        logp = torch.log_softmax(scaled, -1).gather(-1, t[:, None])[:, 0]  # (n,)
        if h_base is None:
            return logp[None]
        return torch.stack((logp, kl_divergence(logits, model.lm_head(h_base))))  # (2, n)

    # (N, C) and (N,): the N real completion tokens, row after row, each row's in order
    inputs = [forward(ids, mask, logits_from=start, head=False, checkpoint=checkpoint)[:, :-1][ends],
              ids[:, start + 1:][ends]]
    if kl:
        with torch.no_grad():
            inputs.append(model(ids, mask, logits_from=start, head=False)[:, :-1][ends])
    chunks = [torch.utils.checkpoint.checkpoint(head, *(x[s:s + LOGPROB_CHUNK] for x in inputs), use_reentrant=False)
              for s in range(0, len(inputs[1]), LOGPROB_CHUNK)]
    flat = torch.cat(chunks, 1)  # (1 or 2, N), in the order in which comp_mask marks the tokens
    out = tuple(flat.new_zeros(comp_mask.shape).masked_scatter(comp_mask, row) for row in flat)  # (B, L) each
    return (out[0], comp_mask) + out[1:]
