"""The SVD of a checkpoint's weights, computed once and cached on disk (used by svf.py).

The SVD of SmolLM2-135M's 90 MLP matrices takes about 10 s on a CPU, and reading the cached factors
about 0.1 s (RESULTS.md). So they are written to $T2_CACHE_DIR/svd/ once and memory-mapped after. A
cache file is named and checked by the checkpoint's identity, a digest of its contents
(checkpoint_identity). Expert files record the same identity, so that svf.py can refuse an expert
trained on another checkpoint.
"""

import hashlib
import json
import os
import stat
import time

import torch

import safetensors_io
from checkpoints import cache_dir

CACHE_FORMAT = "transformer2-svd/2"  # 2: keyed by the weights' dtype too


# ----------------------------------------------------------------------------- checkpoint identity

MEMO_BYTES = 64 * 2**20  # files this large have their digest remembered (hashing 16 GB takes ~30 s)


def file_digest(path):
    """sha256 of every byte of a file. For a large file the digest is remembered in the cache
    directory under its path, size and modification time, and computed again when any of them
    changes: the time only decides when to hash again, the digest is of the contents alone."""
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO would make open() wait forever
        raise ValueError(f"{path} is not a regular file; expected a checkpoint file")
    if st.st_size < MEMO_BYTES:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    memo_path = os.path.join(cache_dir(), "file-digests.json")
    key, stamp = os.path.realpath(path), [st.st_size, st.st_mtime_ns]
    try:
        with open(memo_path) as f:
            memo = json.load(f)
    except (OSError, ValueError):
        memo = {}
    if memo.get(key, {}).get("stamp") == stamp:
        return memo[key]["sha256"]
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    memo[key] = {"stamp": stamp, "sha256": digest}
    os.makedirs(os.path.dirname(memo_path), exist_ok=True)
    tmp = f"{memo_path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(memo, f, indent=0)
    os.replace(tmp, memo_path)  # atomic: a concurrent reader sees the old memo or the new one
    return digest


def checkpoint_identity(model_dir):
    """'name@digest' naming a checkpoint directory by its contents: a sha256 of config.json and of
    every byte of each *.safetensors file.

    Every byte, because two fine-tunes of one architecture share their headers and may differ in
    one matrix: an identity that sampled the file missed a change to 82 of the default model's 90
    MLP matrices, reused a stale SVD and loaded an expert trained on other weights. The digest of a
    large file is computed once (file_digest). No modification times in the identity: copying a
    checkpoint or converting it again must not orphan the experts trained on it. The name is for
    people; only the digest is compared (same_checkpoint).
    """
    h = hashlib.sha256()
    with safetensors_io.open_regular(os.path.join(model_dir, "config.json"), ValueError, "model config (JSON)") as f:
        h.update(f.read())
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files to identify the checkpoint by")
    for name in files:
        h.update(f"{name}:{file_digest(os.path.join(model_dir, name))}".encode())
    return f"{os.path.basename(os.path.abspath(model_dir))}@{h.hexdigest()[:16]}"


def same_checkpoint(a, b):
    return a.rsplit("@", 1)[-1] == b.rsplit("@", 1)[-1]


# ----------------------------------------------------------------------------- decomposition + cache

def cache_path(identity, targets, dtype="float32"):
    """Where the factors of this checkpoint's `targets` matrices, decomposed from weights held in
    `dtype`, are cached. The dtype is part of the key: the SVD of bfloat16-rounded weights differs
    from the float32 one by 1e-3 (relative), far more than float32's own error."""
    return os.path.join(cache_dir(), "svd", f"{identity.replace('/', '_')}-{targets}-{dtype}.safetensors")


def dtype_name(W):
    return str(W.dtype).removeprefix("torch.")


@torch.no_grad()
def decompose(W):
    """W (m, n) -> U (m, r), sigma (r,), Vh (r, n), r = min(m, n): the thin SVD in float32."""
    U, sigma, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return U.contiguous(), sigma.contiguous(), Vh.contiguous()


# How closely U diag(sigma) Vh must give back the weights, relative to the largest singular value:
# float32's SVD is exact to ~1e-6; in bfloat16 the weights themselves carry 2^-8 of rounding.
TOLERANCE = {"float32": 1e-5, "float64": 1e-5, "bfloat16": 1e-2, "float16": 1e-3}


def _check_cache(path, identity, targets, weights):
    """Returns the factors in `path` if they belong to these weights; raises ValueError saying why not."""
    tensors, meta = safetensors_io.load(path)
    dtype = dtype_name(next(iter(weights.values())))
    found = (meta.get("format"), meta.get("checkpoint"), meta.get("targets"), meta.get("dtype"))
    if found != (CACHE_FORMAT, identity, targets, dtype):
        raise ValueError(f"it holds {found}, expected {(CACHE_FORMAT, identity, targets, dtype)}")
    factors = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    for name, W in weights.items():
        try:
            U, sigma, Vh = (tensors[f"{name}.{k}"] for k in ("U", "sigma", "Vh"))
        except KeyError as e:
            raise ValueError(f"it lacks {e}") from None
        (m, n), r = W.shape, min(W.shape)
        if (U.shape, sigma.shape, Vh.shape) != ((m, r), (r,), (r, n)):
            raise ValueError(f"{name}: factors of shapes {U.shape} {sigma.shape} {Vh.shape} for W {W.shape}")
        # Spot check: 64 random entries of U diag(sigma) Vh against the weights the model holds now,
        # to the tolerance of their dtype, so that factors of other weights are never used.
        i, j = (torch.randint(k, (64,), generator=g, device="cpu") for k in (m, n))
        approx = ((U[i] * sigma) * Vh[:, j].T).sum(1)
        exact = W.detach()[i.to(W.device), j.to(W.device)].float().cpu()
        if not torch.allclose(approx, exact, rtol=0, atol=TOLERANCE.get(dtype, 1e-2) * float(sigma[0])):
            raise ValueError(f"{name}: the factors do not reproduce the model's weights (stale cache)")
        # sigma stays float32, so svf keeps this very tensor: a copy, or its view would keep the whole
        # file mapped, and in bfloat16 the float32 U and Vh pages read to convert them stayed resident
        # (0.41 GiB for SmolLM2's MLP, issue 38); U and Vh are views still, copied only where converted
        factors[name] = (U, sigma.clone(), Vh)
    return factors


def load_or_decompose(weights, identity, targets, use_cache=True, log=print):
    """{name: (U, sigma, Vh)} for `weights` {name: W}, from the cache when it is valid.

    Cache file: $T2_CACHE_DIR/svd/<identity>-<targets>-<dtype>.safetensors, memory-mapped (loading
    costs no copy); `targets` names the set of matrices (svf.TARGETS), dtype is the weights'. A cache
    that is unreadable or does not match the weights is rebuilt, with a message.
    """
    dtype = dtype_name(next(iter(weights.values())))
    path = cache_path(identity, targets, dtype)
    if use_cache and os.path.exists(path):
        try:
            return _check_cache(path, identity, targets, weights)
        except ValueError as e:  # SafetensorsError is a ValueError too
            log(f"svf: rebuilding the SVD cache {path}: {e}")
    t0 = time.time()
    factors = {name: tuple(t.cpu() for t in decompose(W)) for name, W in weights.items()}
    if use_cache:
        log(f"svf: decomposed {len(factors)} matrices in {time.time() - t0:.1f}s; caching them in {path}")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tensors = {f"{name}.{k}": t for name, f in factors.items() for k, t in zip(("U", "sigma", "Vh"), f)}
        safetensors_io.save(path, tensors, {"format": CACHE_FORMAT, "checkpoint": identity, "targets": targets,
                                            "dtype": dtype})
    return factors
