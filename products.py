"""The matrix products of decoding: linear(x) and attention for the few rows x of one new token per
sequence.

Decoding reads every weight once per token for a handful of rows, so the form of the product
matters more than in prefill or training. `matvec` picks the form measured fastest (RESULTS.md,
"Speed"); on x86 CPUs it multiplies by weights packed once into oneDNN's blocked layout
(`packed_weight`). `attend` is attention for one query per row as two batched products.
model.py's decode path calls them; forward, the plain reference, does not.
"""

import os
import platform

# torch's oneDNN products keep what they built for every shape they have run (ideep's cache,
# LRU_CACHE_CAPACITY, and oneDNN's own primitive cache), up to 1024 shapes each by default, about
# 0.5 MiB a shape (tests/test_dtype_memory.py): decoding meets new shapes at each batch's key length and row count, training at
# each micro-batch's token count, so the caches filled over a run's first steps and the memory after
# a step grew by 0.25 GiB before it stopped (RESULTS.md, "Memory and dtype on any laptop"). 128
# shapes hold all that one decoding step or one micro-batch reuses across its layers. Both are read
# on first use, so they are set here, before any product runs; a value in the environment wins.
for _variable in ("LRU_CACHE_CAPACITY", "ONEDNN_PRIMITIVE_CACHE_CAPACITY"):
    os.environ.setdefault(_variable, "128")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def matvec(linear, x):
    """linear(x) for the few rows x (B, in) of decoding, in the form the CPU's kernels run fastest.

    On the CPU, oneDNN's product with the weight packed once into its blocked layout
    (`packed_weight`): on an Intel Xeon with AMX it decoded 1.1 to 1.4 times as fast as x @ W.T at
    16 and 64 rows, in float32 and bfloat16, and as fast as torch.mv at one row in float32; on an AMD
    EPYC, 1.12 times torch.mv at one row (RESULTS.md, "Speed"). Without packing (another device, a
    torch built without oneDNN, bfloat16 on a CPU without its instructions): torch.mv for one row,
    else linear(x). (W @ x.T, once 1.1 to 1.3 times x @ W.T in bfloat16 on the Xeon before packing,
    was 0.93 times it on the CPUs that now take this branch, an AMD EPYC with AVX2 only.)
    """
    W = linear.weight
    if W.device.type == "cpu" and can_pack(W.dtype):
        y = torch.ops.mkldnn._linear_pointwise(x, packed_weight(linear), None, "none", [], "")  # (B, out)
    elif x.shape[0] == 1:
        y = torch.mv(W, x[0])[None]  # (1, out)
    else:
        return linear(x)
    return y if linear.bias is None else y + linear.bias


_CAN_PACK = {}


def can_pack(dtype):
    """Whether oneDNN can pack weights of `dtype` on this CPU, tried once per dtype on a small matrix
    (x86 builds of torch have oneDNN; its bfloat16 products need AVX-512 or AVX-NE-CONVERT)."""
    if dtype not in _CAN_PACK:
        try:
            W, x = torch.randn(8, 16).to(dtype), torch.randn(3, 16).to(dtype)
            y = torch.ops.mkldnn._linear_pointwise(x, torch.ops.mkldnn._reorder_linear_weight(W, 3),
                                                   None, "none", [], "")
            _CAN_PACK[dtype] = torch.allclose(y.float(), (x @ W.T).float(), rtol=1e-2, atol=1e-2)
        except (RuntimeError, AttributeError):
            _CAN_PACK[dtype] = False
    return _CAN_PACK[dtype]


def native_bfloat16():
    """Whether this CPU runs bfloat16 matrix products in oneDNN's kernels (AVX-512-BF16, AMX,
    AVX-NE-CONVERT). Without them (an AVX2-only CPU) torch falls back to generic loops: on an AMD
    EPYC with AVX2 only, the default model's 211 products took 4 to 7 times as long in bfloat16 as
    in float32 at 16 and 64 rows, a 512-token prefill 6.6 times and a forward and backward 12 times
    (RESULTS.md, "Speed"); one row, bound by reading the weights, was 1.5 times faster.

    Honours the limits a user sets to run as a lesser CPU would: ONEDNN_MAX_CPU_ISA=AVX2 makes
    oneDNN's bfloat16 pack fail (can_pack), and ATEN_CPU_CAPABILITY=avx2 (torch's own vector
    kernels) is read here, so that `ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2` emulates an
    AVX2-only CPU whichever of the two is set."""
    x86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
    if x86 and not torch.backends.cpu.get_cpu_capability().startswith("AVX512"):
        return False  # "AVX2", "DEFAULT", "NO AVX": an AVX2-only CPU, or one limited to it
    return can_pack(torch.bfloat16)


def bfloat16_features():
    """The names /proc/cpuinfo gives this CPU's bfloat16 instructions ("amx_bf16", "avx512_bf16"), for
    messages; empty where torch cannot tell (its private probes, present in torch 2.x)."""
    probes = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    return [name for name, probe in probes if getattr(torch.cpu, probe, lambda: False)()]


def packed_weight(linear):
    """linear.weight reordered into the blocked layout that oneDNN's matrix kernels read (the one
    torch.compile's CPU backend packs weights into), made on first use and kept while the weight is
    the same: it costs a second copy of the weights, and packing them all takes about 0.3 s for the
    default model, once per expert rather than once per token.

    The cache holds the weight's storage, so no other tensor can take its address while the pack is
    kept; a swapped-in tensor (svf.swap_weights), another device or an in-place edit (which bumps
    _version) changes the key and the weight is packed again.
    """
    W = linear.weight
    # A tensor made under torch.inference_mode (a model loaded there) keeps no version counter, and
    # only code inside inference_mode can edit it in place; such an edit is not seen here.
    version = -1 if W.is_inference() else W._version
    key = (W.data_ptr(), version, W.shape, W.stride(), W.dtype)
    cached = linear.__dict__.get("_packed")
    if cached is None or cached[0] != key:
        packed = torch.ops.mkldnn._reorder_linear_weight(W.detach(), 16)  # a layout for any rows; 16 a hint
        cached = linear.__dict__["_packed"] = (key, W.untyped_storage(), packed)
    return cached[2]


def drop_packs(model, names):
    """Forgets the packs (packed_weight) of the linears whose weights `names` name ("...q_proj.weight").
    svf.swap_weights calls it when it swaps their weights back: a pack is a copy of the weight it was
    made from and holds that weight's memory, which would otherwise stay taken until the linear's
    next pack (a training step's rollouts: the last step's W' and its pack, during the backward)."""
    for name in names:
        model.get_submodule(name.rpartition(".")[0]).__dict__.pop("_packed", None)


def attends_whole_cache(k):
    """Whether decoding's attention should read all of a static cache's columns, the unwritten ones
    masked (gpt-fast's way), rather than a slice of the written ones, for a cache of tensors like k.

    A slice of a preallocated cache is strided. oneDNN's bfloat16 batched products (a CPU with native
    bfloat16) copy such an operand first, which cost more than the masked columns: on an AMD EPYC
    with AVX-512-BF16 the slice took 1.2 to 1.4 times as long. In float32, and in bfloat16 without
    native kernels (AVX2 only), the slice is the faster, 1.1 to 1.8 times (RESULTS.md, "Speed"). GPUs
    read the whole cache in bfloat16, as gpt-fast does (not measured here).
    """
    if k.dtype != torch.bfloat16:
        return False
    return k.device.type != "cpu" or native_bfloat16()


def attend(q, k, v, mask=None):
    """softmax(q k^T / sqrt(hd)) v for one new query per row: q (B, nh, hd), k and v (B, nkv, S, hd),
    mask (B, 1, 1, S) True where a key may be seen, None for all -> (B, nh, hd).

    Two batched products instead of F.scaled_dot_product_attention, whose CPU kernel is made for
    many queries: for one, in bfloat16 on an AMD EPYC (AVX-512-BF16, no AMX), it took 6 to 18 times
    as long at 16 and 64 rows (0.86 ms against 0.12 ms a layer at 16 rows and 48 keys), 29% of a
    decoding step; in float32 the two are within a factor 0.6 to 1.5 (RESULTS.md, "Speed"). GPUs keep SDPA. Grouped-query
    attention: query head h reads key/value head h // (nh / nkv), as SDPA's enable_gqa does, so the
    nh / nkv query heads of a group are the rows of one product.
    """
    B, nh, hd = q.shape
    nkv = k.shape[1]
    if q.device.type != "cpu":
        return F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=mask, enable_gqa=nh != nkv)[:, :, 0]
    scores = (q.view(B, nkv, nh // nkv, hd) @ k.transpose(-1, -2)).float() * hd ** -0.5  # (B, nkv, nh/nkv, S)
    if mask is not None:  # the softmax in float32, as SDPA's kernels compute it
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(-1).to(v.dtype) @ v).view(B, nh, hd)
