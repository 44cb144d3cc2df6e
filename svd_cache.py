"""The SVD of a checkpoint's weights, computed once and cached on disk (used by svf.py).

The SVD of SmolLM2-135M's 90 MLP matrices takes about 10 s on a CPU, and reading the cached factors
about 0.1 s (README). So they are written to $T2_CACHE_DIR/svd/ once and memory-mapped after. A
cache file is named and checked by the checkpoint's identity, a digest of its contents
(checkpoint_identity). Expert files record the same identity, so that svf.py can refuse an expert
trained on another checkpoint.
"""

import hashlib
import os
import time

import torch

import safetensors_io
from checkpoints import cache_dir

CACHE_FORMAT = "transformer2-svd/1"


# ----------------------------------------------------------------------------- checkpoint identity

def checkpoint_identity(model_dir, samples=16, sample_bytes=4096):
    """'name@digest' naming a checkpoint directory by its contents, cheap for a checkpoint of any size.

    The digest covers config.json and, for each *.safetensors file, its size, its header (names,
    dtypes, shapes) and 16 samples of 4 KiB spread over its data. No modification times: copying a
    checkpoint or converting it again must not orphan the experts trained on it. The samples are
    there because two fine-tunes of one architecture have identical headers. The name is for
    people; only the digest is compared (same_checkpoint).
    """
    h = hashlib.sha256()
    with open(os.path.join(model_dir, "config.json"), "rb") as f:
        h.update(f.read())
    files = sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors files to identify the checkpoint by")
    for name in files:
        path = os.path.join(model_dir, name)
        _, _, start = safetensors_io.read_header(path)
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(start))
            span = max(size - start - sample_bytes, 0)
            for i in range(samples):
                f.seek(start + span * i // (samples - 1))
                h.update(f.read(sample_bytes))
    return f"{os.path.basename(os.path.abspath(model_dir))}@{h.hexdigest()[:16]}"


def same_checkpoint(a, b):
    return a.rsplit("@", 1)[-1] == b.rsplit("@", 1)[-1]


# ----------------------------------------------------------------------------- decomposition + cache

def cache_path(identity, targets):
    """Where the factors of this checkpoint's `targets` matrices are cached."""
    return os.path.join(cache_dir(), "svd", f"{identity.replace('/', '_')}-{targets}.safetensors")


@torch.no_grad()
def decompose(W):
    """W (m, n) -> U (m, r), sigma (r,), Vh (r, n), r = min(m, n): the thin SVD in float32."""
    U, sigma, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    return U.contiguous(), sigma.contiguous(), Vh.contiguous()


def _check_cache(path, identity, targets, weights):
    """Returns the factors in `path` if they belong to these weights; raises ValueError saying why not."""
    tensors, meta = safetensors_io.load(path)
    found = (meta.get("format"), meta.get("checkpoint"), meta.get("targets"))
    if found != (CACHE_FORMAT, identity, targets):
        raise ValueError(f"it holds {found}, expected {(CACHE_FORMAT, identity, targets)}")
    factors = {}
    g = torch.Generator().manual_seed(0)
    for name, W in weights.items():
        try:
            U, sigma, Vh = (tensors[f"{name}.{k}"] for k in ("U", "sigma", "Vh"))
        except KeyError as e:
            raise ValueError(f"it lacks {e}") from None
        (m, n), r = W.shape, min(W.shape)
        if (U.shape, sigma.shape, Vh.shape) != ((m, r), (r,), (r, n)):
            raise ValueError(f"{name}: factors of shapes {U.shape} {sigma.shape} {Vh.shape} for W {W.shape}")
        # Spot check: 8 random entries of U diag(sigma) Vh against the weights the model holds now, so
        # that a checkpoint changed under an unchanged identity is noticed. The tolerance admits the
        # float32 SVD error and bfloat16 rounding (a model loaded in bf16), not different weights.
        i, j = torch.randint(m, (8,), generator=g), torch.randint(n, (8,), generator=g)
        approx = ((U[i] * sigma) * Vh[:, j].T).sum(1)
        exact = W.detach()[i.to(W.device), j.to(W.device)].float().cpu()
        if not torch.allclose(approx, exact, rtol=1e-2, atol=1e-4 * float(sigma[0])):
            raise ValueError(f"{name}: the factors do not reproduce the model's weights (stale cache)")
        factors[name] = (U, sigma, Vh)
    return factors


def load_or_decompose(weights, identity, targets, use_cache=True, log=print):
    """{name: (U, sigma, Vh)} for `weights` {name: W}, from the cache when it is valid.

    Cache file: $T2_CACHE_DIR/svd/<identity>-<targets>.safetensors, memory-mapped (loading costs
    no copy); `targets` names the set of matrices (svf.TARGETS). A cache that is unreadable or does
    not match the weights is rebuilt, with a message.
    """
    path = cache_path(identity, targets)
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
        safetensors_io.save(path, tensors, {"format": CACHE_FORMAT, "checkpoint": identity, "targets": targets})
    return factors
