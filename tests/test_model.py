"""model.py against a naive reference written here, plus cache, padding, loading and the real model."""

import json
import math
import os

import pytest
import torch

import safetensors_io
from generate import draw, generate, nucleus, nucleus_by_sort
import logprobs
from logprobs import token_logprobs
import products
from model import KVCache, ModelConfig, left_pad, load_model

KINDS = ["llama", "qwen2", "llama3", "mistral"]  # mistral: a sliding window of 5, shorter than most inputs


def reference_forward(model, ids):
    """The same network written as plainly as possible: no cache, no masks, loops over heads.
    A layer with a sliding window W masks, beside the future, the keys W or more positions back."""
    c, sd = model.config, dict(model.named_parameters())
    T, hd = ids.shape[0], c.head_dim

    def norm(x, w):
        return w * x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps)

    def linear(x, name):
        y = x @ sd[name + ".weight"].T
        return y + sd[name + ".bias"] if name + ".bias" in sd else y

    inv_freq = [c.rope_theta ** (-2 * i / hd) for i in range(hd // 2)]
    if c.rope_scaling:  # Llama 3.1, written as the three cases of the reference code
        s = c.rope_scaling
        lo_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        hi_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        scaled = []
        for f in inv_freq:
            wl = 2 * math.pi / f
            if wl < hi_wl:
                scaled.append(f)
            elif wl > lo_wl:
                scaled.append(f / s["factor"])
            else:
                sm = (s["original_max_position_embeddings"] / wl - s["low_freq_factor"]) / (
                    s["high_freq_factor"] - s["low_freq_factor"])
                scaled.append((1 - sm) * f / s["factor"] + sm * f)
        inv_freq = scaled

    def rope(x):  # x (T, hd): rotate the pairs (i, i + hd/2) by pos * inv_freq[i]
        out = x.clone()
        for t in range(T):
            for i, f in enumerate(inv_freq):
                a, b = x[t, i], x[t, i + hd // 2]
                cs, sn = math.cos(t * f), math.sin(t * f)
                out[t, i], out[t, i + hd // 2] = a * cs - b * sn, a * sn + b * cs
        return out

    x = sd["model.embed_tokens.weight"][ids]
    group = c.num_attention_heads // c.num_key_value_heads
    for l in range(c.num_hidden_layers):
        p = f"model.layers.{l}."
        h = norm(x, sd[p + "input_layernorm.weight"])
        q, k, v = (linear(h, p + f"self_attn.{n}_proj") for n in "qkv")
        heads = []
        for n in range(c.num_attention_heads):
            kv = n // group
            qn = rope(q[:, n * hd:(n + 1) * hd])
            kn = rope(k[:, kv * hd:(kv + 1) * hd])
            att = qn @ kn.T / math.sqrt(hd)
            att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf"))
            W = c.window(l)
            if W is not None:  # query i sees key j only if i - j < W
                att = att.masked_fill(torch.tensor([[i - j >= W for j in range(T)] for i in range(T)]), float("-inf"))
            heads.append(torch.softmax(att, -1) @ v[:, kv * hd:(kv + 1) * hd])
        x = x + linear(torch.cat(heads, -1), p + "self_attn.o_proj")
        h = norm(x, sd[p + "post_attention_layernorm.weight"])
        gate, up = linear(h, p + "mlp.gate_proj"), linear(h, p + "mlp.up_proj")
        x = x + linear(gate * torch.sigmoid(gate) * up, p + "mlp.down_proj")
    x = norm(x, sd["model.norm.weight"])
    head = sd.get("lm_head.weight", sd["model.embed_tokens.weight"])
    return x @ head.T


@pytest.mark.parametrize("kind", KINDS)
def test_matches_naive_reference(tiny_checkpoint, kind):
    model, config = load_model(tiny_checkpoint(kind))
    ids = torch.randint(0, config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(model(ids[None])[0], reference_forward(model, ids), atol=1e-4, rtol=1e-4)


def test_sliding_window_matches_the_reference_and_changes_the_logits(tiny_checkpoint):
    """Mistral's window in every layer, Qwen2's in the layers from max_window_layers on: forward, the
    chunked log-probabilities of training and scoring, and the naive reference agree, and differ
    from full attention once the input is longer than the window."""
    for kind, overrides in (("mistral", {}), ("qwen2", dict(use_sliding_window=True, sliding_window=3,
                                                             max_window_layers=1))):
        model, config = load_model(tiny_checkpoint(kind, **overrides))
        ids = torch.randint(3, config.vocab_size, (11,), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            got = model(ids[None])[0]
            torch.testing.assert_close(got, reference_forward(model, ids), atol=1e-4, rtol=1e-4)
            W = config.sliding_window
            lp, _ = token_logprobs(model, [ids[:3].tolist()], [ids[3:].tolist()])
            want = torch.log_softmax(got, -1)[2:-1].gather(-1, ids[3:, None])[:, 0]
            torch.testing.assert_close(lp[0], want, atol=1e-5, rtol=1e-5)
            model.config.sliding_window = None  # the same weights attending to the whole context
            full = model(ids[None])[0]
        torch.testing.assert_close(full[:W], got[:W], atol=1e-5, rtol=1e-5)  # inside the window: the same
        assert (full[W:] - got[W:]).abs().max() > 1e-2, kind  # beyond it the window matters


def test_sliding_window_is_read_as_hugging_face_reads_it():
    from conftest import TINY
    from model import sliding_window_of
    mistral = ModelConfig.from_hf(TINY["mistral"])
    assert [mistral.window(i) for i in range(2)] == [5, 5]
    assert ModelConfig.from_hf(dict(TINY["mistral"], sliding_window=None)).window(0) is None  # v0.2 on
    assert sliding_window_of(dict(TINY["llama"], sliding_window=4)) == (None, None)  # Llama has none
    qwen = dict(TINY["qwen2"], sliding_window=3)
    assert sliding_window_of(qwen) == (None, None)  # use_sliding_window: false
    assert sliding_window_of({k: v for k, v in qwen.items() if k != "use_sliding_window"}) == (None, None)
    on = ModelConfig.from_hf(dict(qwen, use_sliding_window=True, max_window_layers=1))
    assert [on.window(i) for i in range(2)] == [None, 3]
    assert [ModelConfig.from_hf(dict(qwen, use_sliding_window=True)).window(i) for i in range(2)] == [None, None]
    types = ["sliding_attention", "full_attention"]
    assert [ModelConfig.from_hf(dict(qwen, use_sliding_window=True, layer_types=types)).window(i)
            for i in range(2)] == [3, None]


def test_config_variants(tiny_checkpoint):
    _, qwen = load_model(tiny_checkpoint("qwen2"))
    assert qwen.qkv_bias and not qwen.attention_bias and qwen.rope_theta == 1e6
    assert qwen.sliding_window is None  # use_sliding_window: false
    _, llama3 = load_model(tiny_checkpoint("llama3"))
    assert llama3.head_dim == 16 and llama3.rope_scaling["factor"] == 8.0


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_matches_full_forward(tiny_checkpoint, kind):
    model, config = load_model(tiny_checkpoint(kind))
    ids = torch.randint(0, config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(config, 2, 12, torch.float32, "cpu")
        steps = [model(ids[:, :5], None, cache)]  # a prefill of 5, a chunk of 3, then one at a time
        steps.append(model(ids[:, 5:8], None, cache))
        steps += [model(ids[:, t:t + 1], None, cache) for t in range(8, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_batch_with_left_padding_equals_rows_alone(tiny_checkpoint, kind):
    model, config = load_model(tiny_checkpoint(kind))
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (7, 2, 12)]
    together = generate(model, prompts, 10, pad_id=0)
    alone = [generate(model, [p], 10)[0] for p in prompts]
    assert together == alone
    # and the log-probs of a completion do not depend on the other rows' lengths
    lp, mask = token_logprobs(model, prompts, together)
    for i, p in enumerate(prompts):
        lp1, _ = token_logprobs(model, [p], [together[i]])
        torch.testing.assert_close(lp[i, :len(together[i])], lp1[0], atol=1e-5, rtol=1e-5)
        assert mask[i].sum() == len(together[i])


@pytest.mark.parametrize("kind", KINDS)
def test_rows_that_stop_early_leave_the_batch_without_changing_the_others(tiny_checkpoint, kind):
    model, config = load_model(tiny_checkpoint(kind))
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3, 7)]
    free = [generate(model, [p], 12)[0] for p in prompts]
    stops = {free[0][1], free[2][5]}  # row 0 stops after 1 token, row 2 after at most 5
    together = generate(model, prompts, 12, stop_tokens=stops, pad_id=0)
    alone = [generate(model, [p], 12, stop_tokens=stops)[0] for p in prompts]
    assert together == alone
    assert len(together[0]) == 1 and len({len(t) for t in together}) > 1  # the batch did shrink


@pytest.fixture(params=["packed", "unpacked"])
def packing(request, monkeypatch):
    """Runs a test with products.matvec's packed weights (where this CPU has them) and without."""
    if request.param == "unpacked":
        monkeypatch.setattr(products, "can_pack", lambda dtype: False)
    return request.param


@pytest.fixture(params=["whole cache", "written columns"])
def cache_width(request, monkeypatch):
    """Runs a test with decoding's attention reading all of the cache's columns (masked), then a slice
    of the written ones, whichever products.attends_whole_cache picks for this CPU: both widths are
    tested on every CPU, and the one it picks is one of them."""
    import model as model_module
    whole = request.param == "whole cache"
    monkeypatch.setattr(model_module, "attends_whole_cache", lambda k: whole)
    return request.param


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_gives_the_logits_of_forward(tiny_checkpoint, kind, dtype, packing, cache_width):
    """Transformer.decode, generation's fast path, against forward on the same cache."""
    model, config = load_model(tiny_checkpoint(kind), dtype=dtype)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.1, rtol=0.05)
    for prompts in ([[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15]], [[5, 6, 7]], [[5, 6], [7, 8]]):  # padded or not
        ids, mask = left_pad(prompts, 0, "cpu")
        B = len(prompts)
        caches = [KVCache(config, B, ids.shape[1] + 3, dtype, "cpu") for _ in range(2)]
        with torch.no_grad():
            for cache in caches:
                model(ids, mask, cache)
            nxt = torch.arange(20, 20 + B)
            fast = [model.decode(nxt + t, caches[0]) for t in range(3)]
            plain = [model(nxt[:, None] + t, None, caches[1])[:, -1] for t in range(3)]
        torch.testing.assert_close(torch.stack(fast), torch.stack(plain), **tol)


@pytest.mark.parametrize("kind", KINDS)
def test_fast_decoding_gives_the_tokens_of_the_plain_path(tiny_checkpoint, kind, packing, cache_width):
    """generate's fast path (Transformer.decode) against the plain one (forward), greedy and sampled,
    on a left-padded batch whose rows stop at different times and leave it."""
    model, config = load_model(tiny_checkpoint(kind))
    g = torch.Generator().manual_seed(5)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 9, 3, 7, 1)]
    free = generate(model, prompts, 12, fast=False)
    stops = {free[0][1], free[2][4]}
    fast = generate(model, prompts, 12, stop_tokens=stops, pad_id=0)
    assert fast == generate(model, prompts, 12, stop_tokens=stops, pad_id=0, fast=False)
    assert len({len(t) for t in fast}) > 1  # the batch did shrink
    assert generate(model, prompts[1:2], 12) == generate(model, prompts[1:2], 12, fast=False)  # one row
    sampled = [generate(model, prompts, 12, temperature=1.0, top_p=0.9, generator=torch.Generator().manual_seed(7),
                        fast=fast_path) for fast_path in (True, False)]
    assert sampled[0] == sampled[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_matvec_equals_the_linear_and_repacks_when_the_weight_changes(dtype, bias):
    """matvec (packed where this CPU can pack) = linear(x) for 1, 3 and 16 rows; the pack is kept
    while the weight stays, and made again for a swapped-in tensor or an in-place edit."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(40, 24, bias=bias).to(dtype).requires_grad_(False)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for rows in (1, 3, 16):
        x = torch.randn(rows, 40).to(dtype)
        torch.testing.assert_close(products.matvec(linear, x), linear(x), **tol)
    if not products.can_pack(dtype):
        pytest.skip(f"oneDNN cannot pack {dtype} weights on this CPU")
    x = torch.randn(3, 40).to(dtype)
    first = products.packed_weight(linear)
    assert products.packed_weight(linear) is first  # kept: packed once, not once per token
    other = torch.randn(24, 40).to(dtype)
    original = linear.weight.data
    linear.weight.data = other  # what svf.swap_weights does
    assert products.packed_weight(linear) is not first
    torch.testing.assert_close(products.matvec(linear, x), linear(x), **tol)
    linear.weight.data = original
    torch.testing.assert_close(products.matvec(linear, x), linear(x), **tol)
    with torch.no_grad():
        linear.weight.mul_(-1)  # in place: same address, a new _version
    torch.testing.assert_close(products.matvec(linear, x), linear(x), **tol)


def test_a_model_loaded_under_inference_mode_decodes_as_forward(tiny_checkpoint):
    """Its weights are inference tensors, which have no version counter for the pack's key."""
    with torch.inference_mode():
        model, _ = load_model(tiny_checkpoint("llama"))
        assert model.lm_head.weight.is_inference()
        prompts = [[5, 6, 7], [8, 9]]
        assert generate(model, prompts, 6) == generate(model, prompts, 6, fast=False)
        assert generate(model, prompts[:1], 6) == generate(model, prompts[:1], 6, fast=False)


def test_a_swap_frees_the_packs_of_the_weights_it_swapped_in(tiny_checkpoint):
    """Packs made under svf.swap_weights (an expert's W') are dropped when the block ends, and the
    model then decodes as before with its own weights, packed again."""
    import svf
    model, _ = load_model(tiny_checkpoint("llama"))
    prompts = [[5, 6, 7], [8, 9]]
    before = generate(model, prompts, 6)
    gate = model.model.layers[0].mlp.gate_proj
    name = "model.layers.0.mlp.gate_proj.weight"
    with svf.swap_weights(model, {name: gate.weight * 1.5}):
        swapped = generate(model, prompts, 6)
        if products.can_pack(torch.float32):
            assert gate.__dict__["_packed"][1].data_ptr() == gate.weight.data_ptr()  # W' was packed
    assert "_packed" not in gate.__dict__
    assert swapped != before and generate(model, prompts, 6) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("nh, nkv", [(4, 4), (6, 2)])
def test_attend_equals_sdpa_for_one_query(dtype, nh, nkv):
    """products.attend (two batched products) = F.scaled_dot_product_attention of one query per row,
    with and without a key mask, for plain and grouped-query heads."""
    g = torch.Generator().manual_seed(nh)
    B, S, hd = 3, 11, 16
    q, k, v = (torch.randn(shape, generator=g).to(dtype) for shape in ((B, nh, hd), (B, nkv, S, hd), (B, nkv, S, hd)))
    mask = torch.rand(B, 1, 1, S, generator=g) < 0.6
    mask[..., -1] = True  # the new token's own key is always there
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for m in (None, mask):
        want = torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=m,
                                                                enable_gqa=nh != nkv)[:, :, 0]
        torch.testing.assert_close(products.attend(q, k, v, m), want, **tol)


def test_prefill_in_length_groups_fills_the_cache_as_one_batch_does(tiny_checkpoint):
    from generate import length_groups, prefill
    assert length_groups([10, 3, 9, 10, 1]) == [[0, 3, 2], [1], [4]]  # 30 columns for 29 tokens; 3 and 1 alone
    model, config = load_model(tiny_checkpoint("llama3"))
    g = torch.Generator().manual_seed(8)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (10, 3, 9, 10, 1)]
    ids, mask = left_pad(prompts, 0, "cpu")
    caches = [KVCache(config, 5, 14, torch.float32, "cpu") for _ in range(2)]
    with torch.no_grad():
        grouped, whole = prefill(model, ids, mask, caches[0]), model(ids, mask, caches[1], logits_from=-1)[:, -1]
    torch.testing.assert_close(grouped, whole, atol=1e-5, rtol=1e-5)
    assert caches[0].length == caches[1].length == 10
    assert torch.equal(caches[0].key_mask, caches[1].key_mask)
    for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v):
        torch.testing.assert_close(a * caches[1].key_mask[:, None, :, None], b * caches[1].key_mask[:, None, :, None],
                                   atol=1e-5, rtol=1e-5)  # the same at every real column


def test_rope_tables_grow_and_match_the_direct_formula(tiny_checkpoint):
    model, config = load_model(tiny_checkpoint("llama3"))
    for n in (10, 700):  # 700: longer than the first table
        pos = torch.arange(n)
        cos, sin = model.rope(pos, n)
        freqs = pos[:, None].float() * model.inv_freq
        torch.testing.assert_close(cos, torch.cat((freqs, freqs), -1).cos(), rtol=0, atol=0)
        torch.testing.assert_close(sin, torch.cat((-freqs.sin(), freqs.sin()), -1), rtol=0, atol=0)


def test_generate_greedy_equals_argmax_loop(tiny_checkpoint):
    model, config = load_model(tiny_checkpoint("llama"))
    seq = [5, 9, 17, 3]
    expect = []
    with torch.no_grad():
        for _ in range(8):
            nxt = model(torch.tensor([seq + expect]))[0, -1].argmax().item()
            expect.append(nxt)
    assert generate(model, [seq], 8) == [expect]
    # a stop token ends the row and is not returned
    assert generate(model, [seq], 8, stop_tokens={expect[3]}) == [expect[:expect.index(expect[3])]]


def test_sampling_is_seeded_and_top_p_tiny_is_greedy(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("llama"))
    run = lambda seed, **kw: generate(model, [[1, 2, 3]], 12, temperature=1.0,
                                      generator=torch.Generator().manual_seed(seed), **kw)
    assert run(0) == run(0)
    assert run(0) != run(1)  # 12 tokens from a 97-word vocabulary at temperature 1
    assert run(5, top_p=1e-6) == generate(model, [[1, 2, 3]], 12)


def test_draw_follows_the_distribution_as_multinomial_does_and_never_draws_a_zero():
    """draw (inverse transform sampling) against torch.multinomial, the plain reference: both draw
    each token at its probability, none of probability 0, the same for the same seed."""
    probs = torch.tensor([[0.5, 0.0, 0.3, 0.15, 0.05, 0.0],  # zeros inside and at the end
                          [0.0, 0.0, 0.0, 0.0, 0.0, 2.0],  # one token
                          [5e-4, 0.125, 0.0, 0.125, 0.125, 0.1245]])  # rows 2 and 3 unnormalised
    n = 100_000
    rows = probs.repeat_interleave(n, 0)  # (3n, 6)
    fast = draw(rows, torch.Generator().manual_seed(0)).view(3, n)
    plain = torch.multinomial(rows, 1, generator=torch.Generator().manual_seed(0)).view(3, n)
    want = probs / probs.sum(1, keepdim=True)
    for tokens in (fast, plain):
        freq = torch.stack([torch.bincount(t, minlength=6) for t in tokens]) / n
        assert (freq[want == 0] == 0).all()
        torch.testing.assert_close(freq, want, atol=6e-3, rtol=0)  # about 4 standard errors
    assert torch.equal(draw(rows, torch.Generator().manual_seed(3)), draw(rows, torch.Generator().manual_seed(3)))
    assert not torch.equal(draw(rows, torch.Generator().manual_seed(3)), draw(rows, torch.Generator().manual_seed(4)))


@pytest.mark.parametrize("V", [10, 300, 5000])
def test_nucleus_from_topk_candidates_equals_the_full_sort(V):
    """nucleus (top-k candidates, grown until they hold the nucleus) = nucleus_by_sort, from peaked
    rows (nucleus of a few tokens) to flat ones (nucleus of thousands, k grown several times, and
    equal probabilities among them)."""
    g = torch.Generator().manual_seed(V)
    for scale in (8.0, 2.0, 0.3, 0.01):
        probs = torch.softmax(torch.randn(6, V, generator=g, dtype=torch.float64) * scale, -1).float()
        for top_p in (1e-6, 0.3, 0.9, 0.999):
            fast, plain = nucleus(probs, top_p), nucleus_by_sort(probs, top_p)
            assert ((fast == 0) | (fast == probs)).all() and ((fast > 0).sum(1) >= 1).all()
            # the same kept probabilities; which of several equal ones sits at the edge is either's choice
            assert torch.equal(fast.sort(-1).values, plain.sort(-1).values), (scale, top_p)


def test_token_logprobs_match_log_softmax_and_have_gradients(tiny_checkpoint):
    model, _ = load_model(tiny_checkpoint("qwen2"))
    prompt, completion = [4, 8, 15], [16, 23, 42]
    lp, mask = token_logprobs(model, [prompt], [completion])
    full = torch.log_softmax(model(torch.tensor([prompt + completion])), -1)[0]
    expect = torch.stack([full[2 + t, c] for t, c in enumerate(completion)])
    torch.testing.assert_close(lp[0], expect)
    lp.sum().backward()
    assert model.model.layers[0].mlp.up_proj.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_logprobs_and_kl_equal_the_plain_ones_and_so_do_their_gradients(tiny_checkpoint, kind, monkeypatch):
    """token_logprobs computes the head and the log-softmax in chunks, recomputed in the backward
    pass; the plain path (return_logits=True) holds the whole logits. Same values, same gradients."""
    monkeypatch.setattr(logprobs, "LOGPROB_CHUNK", 4)  # several chunks, split inside rows
    model, config = load_model(tiny_checkpoint(kind), dtype=torch.float64)
    model.requires_grad_(False)
    g = torch.Generator().manual_seed(6)
    prompts = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (4, 7, 2)]
    completions = [torch.randint(3, config.vocab_size, (n,), generator=g).tolist() for n in (5, 1, 9)]
    # an "expert": the MLP weights perturbed, as leaves of a functional_call, as reinforce.py does
    leaves = {n: (p * (1 + 0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))).requires_grad_()
              for n, p in model.named_parameters() if ".mlp." in n}
    forward = lambda ids, mask, **kw: torch.func.functional_call(model, leaves, (ids, mask), kw)
    weights = torch.rand(3, 9, generator=g, dtype=torch.float64)
    results = []
    for plain in (False, True):
        logp, mask, *rest = token_logprobs(model, prompts, completions, 0, forward, return_logits=plain,
                                           temperature=0.7, kl=True)
        kl = rest[-1]
        ((logp * weights).sum() + (kl * weights.flip(1)).sum()).backward()
        results.append([logp, kl, mask] + [leaves[n].grad.clone() for n in leaves])
        for leaf in leaves.values():
            leaf.grad = None
    assert results[0][1].sum() > 1e-3  # the KL is not trivially zero
    for chunked, plain in zip(*results):  # float64, but RMSNorm computes in float32 as the reference does
        torch.testing.assert_close(chunked, plain, rtol=1e-5, atol=1e-7)


def test_checkpointed_layers_give_the_gradients_of_held_activations_under_functional_call(tiny_checkpoint):
    """checkpoint=True recomputes each layer in the backward pass, after functional_call has put the
    model's own weights back: the recomputation must still use the leaves (model.checkpointed)."""
    model, config = load_model(tiny_checkpoint("qwen2"))
    model.requires_grad_(False)
    leaves = {n: (p * 1.1).requires_grad_() for n, p in model.named_parameters() if ".mlp." in n or "q_proj" in n}
    forward = lambda ids, mask, **kw: torch.func.functional_call(model, leaves, (ids, mask), kw)
    prompts, completions = [[4, 8, 15], [16, 23]], [[42, 4, 8, 15, 16, 23], [4, 8]]
    grads = []
    for checkpoint in (False, True):
        logp, _ = token_logprobs(model, prompts, completions, 0, forward, checkpoint=checkpoint)
        logp.sum().backward()
        grads.append({n: leaf.grad for n, leaf in leaves.items()})
        for leaf in leaves.values():
            leaf.grad = None
    for n in leaves:
        torch.testing.assert_close(grads[1][n], grads[0][n], rtol=1e-5, atol=1e-7)


def test_chunked_logprobs_never_hold_the_whole_logits(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(logprobs, "LOGPROB_CHUNK", 4)
    model, config = load_model(tiny_checkpoint("qwen2"))
    rows = []
    real_head = model.lm_head.forward
    model.lm_head.forward = lambda h: rows.append(h.shape[:-1].numel()) or real_head(h)
    weights = {p.data_ptr() for p in model.parameters()}
    saved = []  # the vocabulary-sized activations that autograd keeps for the backward pass

    def pack(t):
        if t.data_ptr() not in weights and t.shape[-1:] == (config.vocab_size,):
            saved.append(t.numel())
        return t
    prompts, completions = [[4, 8, 15], [16, 23]], [[42, 4, 8, 15, 16, 23], [4, 8]]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logp, mask = token_logprobs(model, prompts, completions)
    logp.sum().backward()
    assert rows and max(rows) <= 4  # the head saw chunks of at most 4 tokens, forward and backward
    assert sum(rows) == 2 * 8  # the 8 completion tokens, once forward and once recomputed
    assert max(saved, default=0) <= 4 * config.vocab_size  # no logits beyond one chunk's were kept


def test_load_reports_missing_unexpected_and_misshaped(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    f = os.path.join(path, "model.safetensors")
    state, _ = safetensors_io.load(f)
    state = {k: v.clone() for k, v in state.items()}
    del state["model.layers.1.mlp.up_proj.weight"]
    state["model.layers.0.mlp.gate_proj.weight"] = torch.zeros(3, 3)
    state["model.extra.weight"] = torch.zeros(1)
    safetensors_io.save(f, state)
    with pytest.raises(ValueError) as e:
        load_model(path)
    msg = str(e.value)
    assert "model.layers.1.mlp.up_proj.weight" in msg and "model.extra.weight" in msg
    assert "model.layers.0.mlp.gate_proj.weight: checkpoint (3, 3), model (80, 48)" in msg


@pytest.mark.parametrize("change, words", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
])
def test_unsupported_config_is_named(change, words):
    from conftest import TINY
    with pytest.raises(ValueError, match=words):
        ModelConfig.from_hf(dict(TINY["llama"], **change))


def test_safetensors_round_trip(tmp_path):
    f = str(tmp_path / "t.safetensors")
    tensors = {"a": torch.randn(3, 5), "b": torch.randn(7).to(torch.bfloat16), "c": torch.arange(4),
               "d": torch.randn(2, 2).half(), "empty": torch.zeros(0, 3)}
    safetensors_io.save(f, tensors, {"task": "arc"})
    back, meta = safetensors_io.load(f)
    assert meta == {"task": "arc"}
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]  # atomic write left nothing


def test_safetensors_rejects_malformed_files(tmp_path):
    f = str(tmp_path / "t.safetensors")
    safetensors_io.save(f, {"w": torch.randn(64, 64)})
    raw = open(f, "rb").read()
    cases = {
        "truncated": raw[:-100],
        "tiny": raw[:5],
        "header past end": (10**6).to_bytes(8, "little") + raw[8:],
        "not json": raw[:8] + b"{" * (len(raw) - 8),
        "wrong offsets": raw.replace(b"[0,16384]", b"[0,16380]"),
        "bad dtype": raw.replace(b'"F32"', b'"F99"'),
    }
    for name, data in cases.items():
        bad = tmp_path / f"{name}.safetensors"
        bad.write_bytes(data)
        with pytest.raises(safetensors_io.SafetensorsError) as e:
            safetensors_io.load(str(bad))
        assert str(bad) in str(e.value), name


def test_load_model_wrong_path_is_clear(tmp_path):
    with pytest.raises((FileNotFoundError, ValueError)) as e:
        load_model(str(tmp_path / "nowhere"))
    assert "nowhere" in str(e.value)


def test_default_model_knows_paris(default_model):
    model, tok = default_model
    prompt = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = tok.decode(generate(model, [prompt], 24, stop_tokens=tok.stop_tokens, pad_id=tok.pad_id)[0])
    assert "Paris" in answer, answer
