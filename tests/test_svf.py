"""svf.py: decomposition, parameterisation, the recomposition Function (reference and CUDA kernel),
training and inference paths, expert files, mixing and the SVD cache, on tiny random models."""

import os
import shutil
import time

import pytest
import torch

import params
import safetensors_io
import svd_cache
import svf
from generate import generate
from model import load_model

USER_CACHE = os.environ.get("T2_CACHE_DIR")  # read before the fixture below points it elsewhere


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path / "cache"))  # tests leave the user's cache alone


@pytest.fixture
def tiny(tiny_checkpoint):
    """Factory: tiny(kind, targets, seed) -> (model, SVF, checkpoint dir), messages kept in svf.log."""
    def make(kind="llama", targets="all", seed=0, **kw):
        path = tiny_checkpoint(kind, seed=seed)
        model, _ = load_model(path)
        log = []
        s = svf.SVF(model, svf.checkpoint_identity(path), targets, log=log.append, **kw)
        s.log = log
        return model, s, path
    return make


def random_factors(m, r, n, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(m, r, generator=g).to(dtype), torch.rand(r, generator=g).add(0.5).to(dtype),
            torch.randn(r, n, generator=g).to(dtype))


# ----------------------------------------------------------------------------- decomposition

@pytest.mark.parametrize("shape", [(37, 53), (53, 37), (1, 9), (64, 64)])
def test_decomposition_reconstructs_W(shape):
    W = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    U, sigma, Vh = svd_cache.decompose(W)
    r = min(shape)
    assert U.shape == (shape[0], r) and sigma.shape == (r,) and Vh.shape == (r, shape[1])
    assert bool((sigma[:-1] >= sigma[1:]).all())  # ordered, largest first
    torch.testing.assert_close(U @ torch.diag(sigma) @ Vh, W, rtol=0, atol=1e-5 * float(sigma[0]))


def test_W_prime_close_to_W_at_init_and_equal_for_equal_scales(tiny):
    model, s, _ = tiny()
    params = dict(model.named_parameters())
    W_init = s.weights()
    for name in s.names:
        W = params[name]
        rel = float((W_init[name] - W).detach().norm() / W.norm())
        assert 1e-5 < rel < 0.05, f"{name}: relative change {rel} at init"  # close, yet not identical
    # One scale for every singular value: the sum(sigma) / sum(sigma * z) rescaling cancels it exactly.
    for value in (0.3, 1.0, 7.0):
        z = {name: torch.full((len(f.sigma),), value) for name, f in zip(s.names, s.factors)}
        for name, Wp in s.weights(z).items():
            torch.testing.assert_close(Wp, params[name], rtol=0, atol=1e-5 * float(params[name].abs().max()))


def test_parameterisation_matches_the_official_formula(tiny):
    """sigmoid, max_mult and the rescaling, against the official compose_new_params written out."""
    model, s, _ = tiny(max_mult=2.0)
    with torch.no_grad():
        for p in s.p:
            p.add_(torch.randn_like(p))
    ours = s.weights()
    for name, f, p in zip(s.names, s.factors, s.p):
        mm = torch.sigmoid(p) * 2.0
        official = (f.U @ torch.diag_embed(f.sigma * mm) @ f.Vh) * (f.sigma.sum() / (f.sigma * mm).sum())
        torch.testing.assert_close(ours[name], official, rtol=1e-5, atol=1e-6)
        g_ours, = torch.autograd.grad(ours[name].square().sum(), p, retain_graph=True)
        g_official, = torch.autograd.grad(official.square().sum(), p)
        torch.testing.assert_close(g_ours, g_official, rtol=1e-4, atol=1e-7)


# ----------------------------------------------------------------------------- the autograd Function

def test_reference_backward_gradcheck_float64():
    U, s, Vh = random_factors(7, 5, 9, torch.float64)
    s.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda s: svf.Recompose.apply(U, s, Vh, "torch"), (s,))


@pytest.mark.parametrize("m,r,n", [(1, 1, 1), (33, 17, 65), (40, 40, 12)])
def test_custom_backward_equals_autograd(m, r, n):
    U, s, Vh = random_factors(m, r, n)
    G = torch.randn(m, n)
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    W1 = svf.recompose(U, s1, Vh, impl="torch")
    W2 = (U * s2) @ Vh  # plain ops, differentiated by autograd
    torch.testing.assert_close(W1, W2)
    W1.backward(G)
    W2.backward(G)
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-5)


def test_impl_switch():
    U, s, Vh = random_factors(4, 3, 5)
    with pytest.raises(ValueError, match="expected 'auto', 'cuda' or 'torch'"):
        svf.recompose(U, s, Vh, impl="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        svf.recompose(U, s, Vh, impl="cuda")
    torch.testing.assert_close(svf.recompose(U, s, Vh, impl="auto"), (U * s) @ Vh)  # reference on CPU


# ----------------------------------------------------------------------------- the CUDA kernel

def find_cuda_home():
    """CUDA_HOME, CUDA_PATH, /usr/local/cuda, or the parent of the nvcc on PATH: the first with nvcc
    and cuda_runtime.h (an nvcc on PATH may be a wrapper script outside the toolkit)."""
    nvcc = shutil.which("nvcc")
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda",
                 nvcc and os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))):
        if home and all(os.path.exists(os.path.join(home, f)) for f in ("bin/nvcc", "include/cuda_runtime.h")):
            return home
    return None


def test_kernel_compiles_and_links(monkeypatch):
    """Builds kernels/svf_recompose.{cpp,cu} with nvcc and imports it; needs no GPU. CI must run this."""
    from torch.utils import cpp_extension
    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build: no CUDA extension can be built")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        pytest.skip("no CUDA toolkit: nvcc and cuda_runtime.h not found via CUDA_HOME, CUDA_PATH, "
                    "/usr/local/cuda or PATH")
    monkeypatch.setenv("CUDA_HOME", cuda_home)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", cuda_home)  # torch reads it once, at import
    if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # A100 and H100
    monkeypatch.setattr(svf, "_kernel", {})  # a fresh attempt, whatever happened earlier
    t0 = time.time()
    module = svf.load_kernel()
    print(f"kernel built (or found up to date) and imported in {time.time() - t0:.1f}s with {cuda_home}")
    assert callable(module.recompose) and callable(module.grad_s)


def test_kernel_build_failure_is_reported_once(monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("a visible GPU picks the architecture; this tests the message without one")
    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    monkeypatch.setattr(svf, "_kernel", {})
    expected = "not a CUDA build" if torch.version.cuda is None else "set TORCH_CUDA_ARCH_LIST"
    for _ in range(2):  # the second call reports the remembered failure without building again
        with pytest.raises(RuntimeError, match=expected):
            svf.load_kernel()
    assert "module" not in svf._kernel


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the kernel's numerics need one")
SHAPES = [(1, 1, 1), (33, 33, 65), (577, 191, 191), (191, 191, 577), (64, 16, 64), (130, 70, 3)]


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("m,r,n", SHAPES)
def test_kernel_matches_reference(m, r, n, dtype):
    U, s, Vh = (t.cuda() for t in random_factors(m, r, n, dtype))
    G = torch.randn(m, n, device="cuda").to(dtype)
    # Exact reference in float64 from the same (possibly bf16-rounded) inputs.
    U64, s64, Vh64, G64 = (t.double() for t in (U, s, Vh, G))
    W_ref = (U64 * s64) @ Vh64
    grad_ref = ((G64 @ Vh64.T) * U64).sum(0)
    s_var = s.clone().requires_grad_()
    W = svf.recompose(U, s_var, Vh, impl="cuda")
    W.backward(G)
    assert W.dtype == dtype and s_var.grad.dtype == dtype
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    scale_W, scale_g = float(W_ref.abs().max()) + 1, float(grad_ref.abs().max()) + 1
    torch.testing.assert_close(W.double() / scale_W, W_ref / scale_W, **tol)
    torch.testing.assert_close(s_var.grad.double() / scale_g, grad_ref / scale_g, **tol)


@cuda
def test_auto_takes_the_kernel_on_cuda_and_model_paths_agree(tiny):
    model, s, _ = tiny()
    model.cuda()
    s.cuda()
    ids = torch.randint(0, 97, (2, 9), device="cuda")
    s.impl = "torch"
    ref = s(ids)
    s.impl = "auto"
    torch.testing.assert_close(s(ids), ref, rtol=1e-4, atol=1e-4)
    assert "module" in svf._kernel


# ----------------------------------------------------------------------------- training and inference

def test_training_step_changes_only_p(tiny):
    model, s, _ = tiny(targets="mlp")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    p_before = [p.detach().clone() for p in s.p]
    assert [n for n, _ in s.named_parameters()] == [f"p.{i}" for i in range(len(s.names))]
    opt = torch.optim.Adam(s.parameters(), lr=1e-2)
    ids = torch.randint(0, 97, (2, 9))
    loss = torch.nn.functional.cross_entropy(s(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in model.parameters())
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    assert all(not torch.equal(p, q) for p, q in zip(s.p, p_before)), "every p should have moved"


def test_inference_swap_restores_weights_bit_exactly(tiny):
    model, s, _ = tiny()
    params = dict(model.named_parameters())
    before = {k: (v.clone(), v.data_ptr()) for k, v in params.items()}
    ids = torch.randint(0, 97, (1, 8))
    with torch.no_grad():
        for p in s.p:
            p.add_(torch.randn_like(p))
        base, trained = model(ids), s(ids)
        with s.applied() as m:
            swapped = m(ids)
            with s.applied({n: torch.ones(len(f.sigma)) for n, f in zip(s.names, s.factors)}):
                pass  # nested: must restore the outer block's W', not the base weights
            again = model(ids)
        with pytest.raises(RuntimeError), s.applied():
            raise RuntimeError("interrupted generation")
    torch.testing.assert_close(swapped, trained)  # training and inference paths agree
    assert torch.equal(swapped, again)
    assert not torch.allclose(swapped, base)
    for k, v in params.items():
        assert torch.equal(v, before[k][0]) and v.data_ptr() == before[k][1], f"{k} not restored"
    assert torch.equal(model(ids), base)


# ----------------------------------------------------------------------------- experts

def test_expert_round_trip(tiny, tmp_path):
    model, s, _ = tiny()
    with torch.no_grad():
        for p in s.p:
            p.normal_()
    path = tmp_path / "experts" / "arc.safetensors"
    s.save_expert(path, task="arc", steps=40, val_acc=0.625, extra={"lr": 2e-3})
    _, meta, _ = safetensors_io.read_header(path)
    assert meta["targets"] == "all" and meta["checkpoint"] == s.identity
    expert = s.load_expert(path)
    assert expert.info == {"task": "arc", "steps": 40, "val_acc": 0.625, "extra": {"lr": 2e-3}}
    for name, p in zip(s.names, s.p):
        assert torch.equal(expert.p[name], p.detach())
    fresh = svf.SVF(model, s.identity, "all", seed=1)  # another wrapper of the same model
    fresh.load_state(expert.p)
    for name, W in fresh.weights().items():
        torch.testing.assert_close(W, s.weights()[name])


def test_mismatched_expert_is_refused(tiny, tmp_path):
    model, s_all, _ = tiny(targets="all")
    s_mlp = svf.SVF(model, s_all.identity, "mlp")
    path = str(tmp_path / "mlp.safetensors")
    s_mlp.save_expert(path, task="gsm8k")
    with pytest.raises(svf.ExpertMismatch) as e:
        s_all.load_expert(path)
    assert f"trained for checkpoint {s_all.identity} (targets mlp), this model is {s_all.identity} (targets all)" \
        in str(e.value)
    _, other, _ = tiny(targets="mlp", seed=1)  # same architecture, other weights
    with pytest.raises(svf.ExpertMismatch, match=f"this model is {other.identity}"):
        other.load_expert(path)
    # max_mult is a common factor on z, which the rescaling cancels: such an expert loads and agrees.
    s_mult = svf.SVF(model, s_all.identity, "mlp", max_mult=2.0)
    s_mult.load_state(s_mult.load_expert(path).p)
    for name, W in s_mult.weights().items():
        torch.testing.assert_close(W, s_mlp.weights()[name])
    safetensors_io.save(path, {"x": torch.zeros(3)}, {"format": "pt"})
    with pytest.raises(svf.ExpertMismatch, match="is it an SVF expert file"):
        s_mlp.load_expert(path)


def test_load_expert_for_reads_the_targets_from_the_file(tiny, tmp_path):
    model, s_all, path = tiny(targets="all")
    s_mlp = svf.SVF(model, s_all.identity, "mlp", seed=3)
    expert_path = str(tmp_path / "mlp.safetensors")
    s_mlp.save_expert(expert_path, task="gsm8k")
    wrapper, expert = svf.load_expert_for(model, path, expert_path)
    assert wrapper.targets == "mlp" and expert.info == {"task": "gsm8k"}
    for name, p in zip(s_mlp.names, s_mlp.p):
        assert torch.equal(expert.p[name], p.detach())
    safetensors_io.save(expert_path, {"x": torch.zeros(3)}, {"format": "pt"})
    with pytest.raises(svf.ExpertMismatch, match="is it an SVF expert file"):
        svf.load_expert_for(model, path, expert_path)
    with pytest.raises(FileNotFoundError):
        svf.load_expert_for(model, path, str(tmp_path / "missing.safetensors"))


def test_mixing(tiny):
    _, s, _ = tiny(targets="mlp")
    g = torch.Generator().manual_seed(0)
    experts = [svf.Expert({n: torch.randn(len(f.sigma), generator=g) for n, f in zip(s.names, s.factors)})
               for _ in range(3)]
    z = [s.scales(e.p) for e in experts]
    one_hot = s.mix(experts, [0.0, 1.0, 0.0])
    for name in s.names:
        assert torch.equal(one_hot[name], z[1][name])  # a one-hot alpha reproduces that expert
    alpha = torch.tensor([0.2, 0.5, 0.3])
    per_matrix = s.mix(experts, alpha[:, None].expand(3, len(s.names)))
    mixed = s.mix(experts, alpha)
    for name in s.names:
        torch.testing.assert_close(mixed[name], 0.2 * z[0][name] + 0.5 * z[1][name] + 0.3 * z[2][name])
        torch.testing.assert_close(per_matrix[name], mixed[name])
    doubled = s.weights(s.mix(experts, 2 * alpha))  # the rescaling ignores a common factor on alpha
    for name, W in s.weights(mixed).items():
        torch.testing.assert_close(doubled[name], W)
    alpha2 = torch.rand(3, len(s.names), generator=g)
    i = 4
    torch.testing.assert_close(s.mix(experts, alpha2)[s.names[i]], sum(alpha2[k, i] * z[k][s.names[i]] for k in range(3)))
    with pytest.raises(ValueError, match=r"expected \(3,\) or \(3, 6\)"):
        s.mix(experts, torch.ones(3, 2))


# ----------------------------------------------------------------------------- cache and identity

def test_cache_reused_then_rebuilt_when_stale_or_corrupt(tiny):
    model, s, path = tiny(targets="mlp")
    assert any("decomposed 6 matrices" in m for m in s.log)
    said = []
    svf.SVF(model, s.identity, "mlp", log=said.append)
    cache_lines = lambda: [m for m in said if "cache" in m or "decomposed" in m]  # noqa: E731
    log = cache_lines()
    assert log == [] and len(said) == 2  # reused silently; said: the factors' memory and the recomposition path
    # Same identity, other weights (e.g. a checkpoint rewritten in place): the spot check notices.
    with torch.no_grad():
        model.get_parameter(s.names[2]).mul_(-1.5)
    s2 = svf.SVF(model, s.identity, "mlp", log=said.append)
    log = cache_lines()
    assert len(log) == 2 and "stale cache" in log[0] and s.names[2] in log[0]
    f = s2.factors[2]
    W = model.get_parameter(s.names[2])
    torch.testing.assert_close((f.U * f.sigma) @ f.Vh, W, rtol=0, atol=1e-5 * float(f.sigma[0]))
    # A truncated file is rebuilt too, with a message saying what was wrong.
    cache_file = svd_cache.cache_path(s.identity, "mlp")
    with open(cache_file, "r+b") as fh:
        fh.truncate(os.path.getsize(cache_file) // 2)
    said.clear()
    svf.SVF(model, s.identity, "mlp", log=said.append)
    log = cache_lines()
    assert "is the file truncated?" in log[0] and "decomposed" in log[1]


def test_checkpoint_identity(tiny_checkpoint, tmp_path):
    a = tiny_checkpoint("llama", seed=0)
    copy = shutil.copytree(a, tmp_path / "elsewhere")
    ia, icopy = svf.checkpoint_identity(a), svf.checkpoint_identity(copy)
    assert ia != icopy and svf.same_checkpoint(ia, icopy)  # new name, same contents
    other = svf.checkpoint_identity(tiny_checkpoint("llama", seed=1))  # same header, other values
    assert not svf.same_checkpoint(ia, other)


def test_identity_covers_every_byte(tmp_path):
    """Defect 6 of issue 13: an identity that sampled 16 x 4 KiB of the file missed a change
    between its samples, so a stale SVD and an expert of other weights were used without a word."""
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    W = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))  # 4 MiB of data
    safetensors_io.save(str(d / "model.safetensors"), {"w": W}, {})
    before = svf.checkpoint_identity(d)
    _, _, start = safetensors_io.read_header(str(d / "model.safetensors"))
    # halfway between the first two samples the old identity read (each of them 4 KiB long)
    span = os.path.getsize(d / "model.safetensors") - start - 4096
    offset = start + span // 15 // 2
    with open(d / "model.safetensors", "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 1]))  # one bit of one float
    assert not svf.same_checkpoint(before, svf.checkpoint_identity(d))


def test_large_file_digests_are_remembered_until_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setattr(svd_cache, "MEMO_BYTES", 1024)
    path = tmp_path / "big.bin"
    path.write_bytes(b"a" * 4096)
    calls = []
    real = svd_cache.hashlib.file_digest
    monkeypatch.setattr(svd_cache.hashlib, "file_digest", lambda f, algo: calls.append(1) or real(f, algo))
    first = svd_cache.file_digest(path)
    assert svd_cache.file_digest(path) == first and len(calls) == 1      # remembered
    path.write_bytes(b"b" * 4096)
    os.utime(path, ns=(time.time_ns() + 10**9,) * 2)
    assert svd_cache.file_digest(path) != first and len(calls) == 2      # changed: hashed again


def test_svd_cache_is_keyed_by_the_weights_dtype(tiny_checkpoint):
    """Defect 5 of issue 13: after a bfloat16 run cached the SVD of bf16-rounded weights, a float32
    run reused it (W' off by 1e-3 relative at equal scales instead of 1e-6)."""
    path = tiny_checkpoint("llama", seed=0)
    identity = svf.checkpoint_identity(path)
    bf16, _ = load_model(path, dtype=torch.bfloat16)
    svf.SVF(bf16, identity, "mlp", log=lambda *a: None)                 # builds the bfloat16 cache
    model, _ = load_model(path)
    log = []
    s = svf.SVF(model, identity, "mlp", log=log.append)
    assert any("decomposed" in m for m in log)                           # its own float32 SVD
    z = {name: torch.ones(len(f.sigma)) for name, f in zip(s.names, s.factors)}
    for name, Wp in s.weights(z).items():
        W = model.get_parameter(name)
        assert float((Wp - W).norm() / W.norm()) < 1e-5, name
    # and a float32 cache holding bf16-rounded factors is refused by the spot check
    bad = {n: (U, sig, Vh) for n, (U, sig, Vh) in svd_cache.load_or_decompose(
        {n: bf16.get_parameter(n) for n in s.names}, identity, "mlp", use_cache=False).items()}
    tensors = {f"{n}.{k}": t for n, f in bad.items() for k, t in zip(("U", "sigma", "Vh"), f)}
    safetensors_io.save(svd_cache.cache_path(identity, "mlp", "float32"), tensors,
                        {"format": svd_cache.CACHE_FORMAT, "checkpoint": identity, "targets": "mlp", "dtype": "float32"})
    log.clear()
    svf.SVF(model, identity, "mlp", log=log.append)
    assert any("stale cache" in m for m in log)


def test_parameter_count_matches_the_paper():
    c = params.count_params(params.LLAMA3_8B)  # the counting moved to params.py (see tests/test_params.py)
    assert c["mlp"] == 3 * 4096 * 32 and round(c["mlp"] / 1e6, 2) == 0.39
    assert round(c["attn q,v"] / 1e6, 2) == 0.16
    assert round(c["lora"] / 1e6, 2) == 6.82
    assert c["all"] == c["mlp"] + c["attn"]


def test_default_model_at_init(default_model, monkeypatch):
    """The real checkpoint: 90 MLP matrices (cached in the user's cache: slow once, then fast);
    W' ~ W at initialisation changes the logits a little and the answer not at all."""
    import checkpoints
    if USER_CACHE:
        monkeypatch.setenv("T2_CACHE_DIR", USER_CACHE)
    else:
        monkeypatch.delenv("T2_CACHE_DIR")
    model, tok = default_model
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    try:
        s = svf.SVF(model, svf.checkpoint_identity(checkpoints.default_model_dir()), "mlp")
        assert len(s.names) == 3 * model.config.num_hidden_layers == 90
        prompt = tok.chat([{"role": "user", "content": "What is the capital of France?"}])
        with torch.no_grad():
            base = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
            with s.applied():
                adapted = torch.log_softmax(model(torch.tensor([prompt]))[0, -1], -1)
                answer = tok.decode(generate(model, [prompt], 16, stop_tokens=tok.stop_tokens,
                                             pad_id=tok.pad_id)[0])
        assert adapted.argmax() == base.argmax() and 0 < float((adapted - base).abs().max()) < 0.5
        assert "Paris" in answer, answer
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(trainable[name])
