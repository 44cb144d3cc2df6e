"""Singular value fine-tuning (SVF), Transformer-Squared section 3.1 (Sun, Cetin, Tang 2025).

Every targeted weight matrix is decomposed once, W = U diag(sigma) Vh (svd_cache.py), and an
*expert* is one vector per matrix that rescales the singular values. Only that vector is trained; U, sigma, Vh stay frozen:

    p (r,)  --sigmoid * max_mult-->  z (r,)  -->  W' = U diag(sigma * z) Vh * sum(sigma) / sum(sigma * z)

The recomposition is an autograd Function with a plain PyTorch reference and a fused CUDA kernel
(kernels/svf_recompose.cu, built on first use) behind one switch, impl = "auto" | "cuda" | "torch".

    python svf.py --count    # SVF parameters next to LoRA and the others (params.py), as in Table 4

LoRA, the paper's baseline, is lora.py: the same wrapper shape and the same swap (swap_weights).
"""

import argparse
import contextlib
import json
import os
import warnings
from dataclasses import dataclass, field

import torch
import torch.nn as nn

import products
import safetensors_io
from model_config import TARGETS  # the sets of a layer's matrices an expert adapts: "mlp", "attn", "qv", "all"
from svd_cache import checkpoint_identity, load_or_decompose, same_checkpoint  # W = U diag(sigma) Vh, cached

EXPERT_FORMAT = "transformer2-svf-expert/1"
KERNEL_SOURCES = [os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels", f"svf_recompose.{ext}")
                  for ext in ("cpp", "cu")]


class ExpertMismatch(ValueError):
    pass


def target_names(model, targets="mlp"):
    """Names of the targeted weights in model order, e.g. ['model.layers.0.mlp.gate_proj.weight', ...]."""
    if targets not in TARGETS:
        raise ValueError(f"targets={targets!r}; expected one of {sorted(TARGETS)}")
    suffixes = tuple(f".{t}.weight" for t in TARGETS[targets])
    names = [name for name, _ in model.named_parameters() if name.endswith(suffixes)]
    if not names:
        raise ValueError(f"the model has no weights ending in {suffixes}")
    return names


# ----------------------------------------------------------------------------- recomposition

_kernel = {}  # "module" once built, "error" once a build failed: either way we try only once


def load_kernel():
    """Builds kernels/svf_recompose.{cpp,cu} on first use (about a minute; cached by torch after).

    Needs nvcc (CUDA_HOME) and a CUDA build of torch, and TORCH_CUDA_ARCH_LIST where no GPU is
    visible to pick the architecture from. Raises RuntimeError naming what failed.
    """
    if "module" not in _kernel:
        if "error" in _kernel:
            raise RuntimeError(f"the SVF CUDA kernel failed to build: {_kernel['error']}")
        try:
            if torch.version.cuda is None:
                raise RuntimeError(f"torch {torch.__version__} is not a CUDA build")
            if not torch.cuda.is_available() and not os.environ.get("TORCH_CUDA_ARCH_LIST"):
                raise RuntimeError("no GPU is visible; set TORCH_CUDA_ARCH_LIST (e.g. '8.0;9.0') to build")
            from torch.utils.cpp_extension import load
            _kernel["module"] = load(name="svf_recompose", sources=KERNEL_SOURCES,
                                     extra_cuda_cflags=["-O3"], verbose=False)
        except Exception as e:
            _kernel["error"] = e
            raise RuntimeError(f"the SVF CUDA kernel failed to build: {e}") from e
    return _kernel["module"]


class Recompose(torch.autograd.Function):
    """W = U diag(s) Vh with a gradient for s only: U (m, r), s (r,), Vh (r, n) -> W (m, n).

    Backward: dL/ds[k] = sum_ij G[i,j] U[i,k] Vh[k,j] = diag(U^T G Vh^T)[k], G = dL/dW.
    The reference computes (G @ Vh^T) * U summed over rows: m*n*r multiply-adds for the product,
    as many as the forward, and m*r for the rest, the same operations autograd would run through
    (U * s) @ Vh. Forming U^T G Vh^T as a whole would add r*m*r more work and an (r, r) matrix for r
    numbers on its diagonal. The kernel goes one step further and never stores the (m, r) product.
    """

    @staticmethod
    def forward(ctx, U, s, Vh, impl):
        ctx.save_for_backward(U, Vh)
        ctx.impl = impl
        if impl == "cuda":
            return load_kernel().recompose(U, s.contiguous(), Vh)
        return (U * s) @ Vh  # U * s scales column k of U by s[k]: U diag(s)

    @staticmethod
    def backward(ctx, G):
        U, Vh = ctx.saved_tensors
        if not ctx.needs_input_grad[1]:
            return None, None, None, None
        if ctx.impl == "cuda":
            grad_s = load_kernel().grad_s(G.contiguous(), U, Vh).to(U.dtype)
        else:
            grad_s = ((G @ Vh.mT) * U).sum(0)  # (m, r) -> (r,)
        return None, grad_s, None, None


def resolve_impl(impl, U):
    """The path `recompose` takes for factors like U: "cuda" (the kernel) or "torch" (the reference).
    "auto" is the kernel on CUDA tensors of float32 or bfloat16, else the reference, and the
    reference with one warning if the kernel cannot be built."""
    if impl not in ("auto", "cuda", "torch"):
        raise ValueError(f"impl={impl!r}; expected 'auto', 'cuda' or 'torch'")
    if impl == "cuda" and not U.is_cuda:
        raise ValueError(f"impl='cuda' needs CUDA tensors, found U on {U.device}")
    if impl != "auto":
        return impl
    if not (U.is_cuda and U.dtype in (torch.float32, torch.bfloat16)):
        return "torch"
    try:
        load_kernel()
        return "cuda"
    except RuntimeError as e:
        if not _kernel.get("warned"):
            _kernel["warned"] = True
            warnings.warn(f"{e}; using the PyTorch reference", stacklevel=3)
        return "torch"


def recompose(U, s, Vh, impl="auto"):
    """U diag(s) Vh. impl: "torch" (reference), "cuda" (the kernel), "auto" (resolve_impl)."""
    return Recompose.apply(U, s.to(U.dtype), Vh, resolve_impl(impl, U))


# ----------------------------------------------------------------------------- swapping weights in

@contextlib.contextmanager
def swap_weights(model, weights):
    """`with swap_weights(model, {name: W'}):` the model computes with W'; afterwards it holds its
    original tensors. Shared by SVF.applied and lora.LoRA.applied.

    We swap tensors rather than copy values into them: restoring is then bit-exact by construction,
    costs nothing, and works on read-only memory-mapped weights. Switching experts never reloads the
    model. Nesting works: the inner block restores the outer block's weights.
    """
    params = {name: model.get_parameter(name) for name in weights}
    originals = {}
    try:
        for name, W in weights.items():
            originals[name] = params[name].data
            params[name].data = W
        yield model
    finally:
        for name, W in originals.items():
            params[name].data = W
        products.drop_packs(model, originals)  # decoding's copies of W', if it packed them


# ----------------------------------------------------------------------------- the SVF wrapper

class _Factors(nn.Module):
    """The frozen U, sigma, Vh of one matrix, as buffers so that .to(device) moves them."""

    def __init__(self, U, sigma, Vh):
        super().__init__()
        for k, t in (("U", U), ("sigma", sigma), ("Vh", Vh)):
            self.register_buffer(k, t, persistent=False)  # experts store p only


def factor_bytes(weights, dtype):
    """Bytes of U (m, r), Vh (r, n) in `dtype` and sigma (r,) in float32 for weights {name: W (m, n)}."""
    size = torch.empty((), dtype=dtype, device="cpu").element_size()
    return sum(min(W.shape) * ((W.shape[0] + W.shape[1]) * size + 4) for W in weights.values())


def check_factor_memory(weights, dtype, device, log=print):
    """Says how much memory the factors take before they are made, and on a GPU refuses, with what is
    free, when they cannot fit (the SVD itself needs room for one matrix's float32 copy besides)."""
    need = factor_bytes(weights, dtype)
    W = max(weights.values(), key=lambda t: t.numel())
    log(f"svf: the factors of {len(weights)} matrices take {need / 2**30:.2f} GiB "
        f"({need / sum(t.numel() * t.element_size() for t in weights.values()):.2f}x the weights they replace)")
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        svd_room = 4 * W.numel() * 3  # float32 W, U and Vh of the largest matrix while it is decomposed
        if need + svd_room > free:
            raise MemoryError(f"the SVF factors need {need / 2**30:.2f} GiB on {device} (+{svd_room / 2**30:.2f} GiB "
                              f"while decomposing), but {free / 2**30:.2f} of {total / 2**30:.2f} GiB are free: use "
                              f"--dtype bfloat16, fewer --targets, or a GPU with more memory")
    return need


@dataclass
class Expert:
    p: dict  # {weight name: p (r,)}; for a LoRA file (lora.py) {factor key: A or B}
    info: dict = field(default_factory=dict)  # what the training run reported: task, steps, accuracy
    path: str = ""


class SVF(nn.Module):
    """SVF around a model: frozen U, sigma, Vh per targeted matrix and one trainable p (r,) each.

    svf.parameters() are the p vectors alone (the model is held, not registered as a submodule, and
    its own weights are frozen). Train with `svf(input_ids)`; infer with `with svf.applied(z): ...`.
    """

    def __init__(self, model, identity, targets="mlp", max_mult=1.0, seed=0, impl="auto",
                 dtype=None, use_cache=True, log=print):
        super().__init__()
        object.__setattr__(self, "model", model)  # plain attribute: keeps the model out of parameters()
        model.requires_grad_(False)  # autograd must reach p and nothing else
        self.identity, self.targets, self.max_mult, self.impl = identity, targets, max_mult, impl
        self.names = target_names(model, targets)
        weights = {n: model.get_parameter(n) for n in self.names}
        W0 = weights[self.names[0]]
        device, dtype = W0.device, dtype or W0.dtype  # factors in the model's dtype: bfloat16 stays bfloat16
        check_factor_memory(weights, dtype, device, log)
        factors = load_or_decompose(weights, identity, targets, use_cache, log)
        self.factors = nn.ModuleList()
        for name in self.names:  # sigma stays float32: it is tiny, and s is computed from it
            U, sigma, Vh = factors[name]
            self.factors.append(_Factors(U.to(device, dtype), sigma.to(device), Vh.to(device, dtype)))
        path = resolve_impl(impl, self.factors[0].U)
        log(f"svf: {len(self.names)} {targets} matrices, factors in {str(dtype).removeprefix('torch.')} on {device}; "
            f"recomposition by {'the CUDA kernel (kernels/svf_recompose.cu)' if path == 'cuda' else 'the PyTorch reference'}")
        # Official initialisation: p = 0.1 + 0.01 N(0, 1), so sigmoid(p) ~ 0.525 everywhere; the
        # rescaling below makes W' ~ W all the same. p is float32 whatever the model's dtype (the
        # official code keeps it in bfloat16); drawn on the CPU, so every device starts alike.
        g = torch.Generator(device="cpu").manual_seed(seed)
        self.p = nn.ParameterList(
            nn.Parameter((0.1 + 0.01 * torch.randn(len(f.sigma), generator=g, device="cpu")).to(device))
            for f in self.factors)

    def state(self):
        """{name: p} detached copies of the trainable vectors (what an expert file stores)."""
        return {name: p.detach().clone() for name, p in zip(self.names, self.p)}

    @torch.no_grad()
    def load_state(self, p):
        self._check_names(p, "p")
        for name, param in zip(self.names, self.p):
            param.copy_(p[name])

    def scales(self, p=None):
        """z = sigmoid(p) * max_mult for each matrix: {name: z (r,)}. p: a dict, default the trainable ones."""
        p = dict(zip(self.names, self.p)) if p is None else p
        self._check_names(p, "p")
        return {name: torch.sigmoid(p[name]) * self.max_mult for name in self.names}

    def weights(self, z=None):
        """{name: W'} recomposed from the scales z (default: from the trainable p), in the model's dtype.

        Paper, section 3.1: W' = U Sigma' Vh with Sigma' = Sigma diag(z), i.e. singular values sigma * z.
        Official code, followed here: the same, times sum(sigma) / sum(sigma * z), so that a z that
        scales every singular value alike leaves W unchanged and W' ~ W at initialisation. (So
        max_mult, a common factor on z, cancels: it is kept and recorded to match the official
        code.) Folding that factor into the vector s keeps the matrix product one call.
        """
        z = self.scales() if z is None else z
        self._check_names(z, "z")
        out = {}
        for name, f in zip(self.names, self.factors):
            s = f.sigma * z[name]  # (r,)
            s = s * (f.sigma.sum() / s.sum())
            out[name] = recompose(f.U, s, f.Vh, self.impl).to(self.model.get_parameter(name).dtype)
        return out

    def forward(self, *args, **kwargs):
        """The model's forward with W' in place of the targeted weights; autograd reaches only p."""
        return torch.func.functional_call(self.model, self.weights(), args, kwargs)

    def applied(self, z=None, weights=None):
        """`with svf.applied(z):` the model computes with W' (default: from the trainable p); afterwards
        it holds its original tensors, bit-exactly (swap_weights). `weights` ({name: W'}, from
        self.weights()) skips the recomposition when the caller has it."""
        if weights is None:
            with torch.no_grad():
                weights = self.weights(z)
        return swap_weights(self.model, weights)

    def mix(self, experts, alpha):
        """z' = sum_k alpha_k z_k: alpha (K,) one weight per expert, or (K, n_matrices) one per expert and matrix.

        alpha mixes the scales z = sigmoid(p) * max_mult, as the paper writes it, not the raw p. The
        official few-shot code (WeightedCombination) mixes raw p and then uses the mix as z without
        the sigmoid, so a one-hot alpha there does not reproduce the expert it selects; here it does,
        and z' stays linear in alpha. The sum(sigma) / sum(sigma * z) rescaling makes W' blind to a
        common factor on alpha, so alpha needs no normalisation.
        """
        zs = [self.scales(e.p if isinstance(e, Expert) else e) for e in experts]
        alpha = torch.as_tensor(alpha, dtype=torch.float32, device=self.p[0].device)
        if alpha.dim() == 1:
            alpha = alpha[:, None].expand(len(experts), len(self.names))
        if alpha.shape != (len(experts), len(self.names)):
            raise ValueError(f"alpha of shape {tuple(alpha.shape)}; expected ({len(experts)},) or "
                             f"({len(experts)}, {len(self.names)}) for {len(experts)} experts, {len(self.names)} matrices")
        return {name: sum(alpha[k, i] * zs[k][name] for k in range(len(experts)))
                for i, name in enumerate(self.names)}

    # ------------------------------------------------------------------------- expert files

    def save_expert(self, path, p=None, **info):
        """Writes {name: p} (default: the trainable p) and metadata atomically as safetensors.

        info: what the training run reports (task, steps, val_acc, any JSON-able dict).
        """
        p = self.state() if p is None else p
        self._check_names(p, "p")
        meta = {"format": EXPERT_FORMAT, "checkpoint": self.identity, "targets": self.targets,
                "parameterisation": json.dumps({"z": "sigmoid(p) * max_mult", "max_mult": self.max_mult,
                                                "rescale": "sum(sigma) / sum(sigma * z)"}),
                "shapes": json.dumps({name: list(self.model.get_parameter(name).shape) for name in self.names}),
                "info": json.dumps(info, default=str)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        safetensors_io.save(path, {name: t.detach().float().cpu() for name, t in p.items()}, meta)

    def load_expert(self, path):
        """Reads an expert file made for this checkpoint and targets; raises ExpertMismatch otherwise
        (and safetensors_io.SafetensorsError for a file that is not a regular file, is malformed, or
        holds other than finite float32 vectors), before anything is copied."""
        tensors, meta = safetensors_io.load(path, dtype=torch.float32, finite=True)
        info = expert_metadata(path, meta)
        if not same_checkpoint(meta["checkpoint"], self.identity) or meta["targets"] != self.targets:
            raise ExpertMismatch(f"{path}: expert was trained for checkpoint {meta['checkpoint']} (targets "
                                 f"{meta['targets']}), this model is {self.identity} (targets {self.targets})")
        # No check of max_mult: it multiplies every entry of z alike, and the rescaling cancels that.
        self._check_names(tensors, f"expert {path}")
        for name, f in zip(self.names, self.factors):  # finite p whose every scale underflows to 0 (p < -104)
            if not bool((f.sigma * torch.sigmoid(tensors[name].to(f.sigma.device))).sum() > 0):  # leaves 0 / 0 in W'
                raise ExpertMismatch(f"{path}: tensor {name!r} scales every singular value by 0 (its largest p, "
                                     f"{tensors[name].max().item():.4g}, underflows sigmoid), which leaves W' 0 / 0; "
                                     f"expected some p above about -100")
        device = self.p[0].device
        return Expert({name: tensors[name].to(device, copy=True) for name in self.names}, info, path)

    def _check_names(self, vectors, what):
        expected = {name: (len(f.sigma),) for name, f in zip(self.names, self.factors)}
        found = {name: tuple(t.shape) for name, t in vectors.items()}
        if found != expected:
            diff = sorted(set(found.items()) ^ set(expected.items()))[:4]
            raise ExpertMismatch(f"{what} does not fit targets {self.targets!r} of {self.identity}: "
                                 f"(name, shape) differing from what is expected: {diff}")


def expert_metadata(path, meta, format=EXPERT_FORMAT, keys=("checkpoint", "targets", "info")):
    """The `info` dict of an expert file's metadata, after checking its format and that `keys` are there;
    ExpertMismatch naming the file and what is missing otherwise."""
    if meta.get("format") != format:
        raise ExpertMismatch(f"{path}: format {meta.get('format')!r}, expected {format!r} "
                             f"(is it {'an SVF expert' if format == EXPERT_FORMAT else 'a LoRA'} file?)")
    missing = [key for key in keys if key not in meta]
    if missing:
        raise ExpertMismatch(f"{path}: its metadata lacks {missing}; a file written by reinforce.py has {list(keys)}")
    if "targets" in keys and meta["targets"] not in TARGETS:
        raise ExpertMismatch(f"{path}: targets {meta['targets']!r}; expected one of {sorted(TARGETS)}")
    try:
        info = json.loads(meta["info"])
    except ValueError as e:
        raise ExpertMismatch(f"{path}: its metadata's info is not JSON ({e})") from None
    if not isinstance(info, dict):
        raise ExpertMismatch(f"{path}: its metadata's info is a JSON {type(info).__name__}, expected an object")
    return info


def file_info(path):
    """What the run that wrote an expert or a cem.py mix recorded in it (task, prompt, steps, accuracy,
    shots, ...), read from the file's header alone: no model needed."""
    meta = safetensors_io.read_header(path)[1]
    return expert_metadata(path, meta, meta.get("format"), keys=("info",)) if "info" in meta else {}


def load_expert_for(model, model_dir, path, **svf_kwargs):
    """(SVF wrapper, Expert) for an expert file: the targets are read from the file itself, whose
    header is checked before the wrapper (and its SVD) is made; load_expert then refuses a file that
    belongs to another checkpoint."""
    _, meta, _ = safetensors_io.read_header(path)
    expert_metadata(path, meta)
    safetensors_io.load(path, dtype=torch.float32, finite=True)  # a few vectors: refused, if need be, before the SVD
    wrapper = SVF(model, checkpoint_identity(model_dir), meta["targets"], **svf_kwargs)
    return wrapper, wrapper.load_expert(path)


def main(argv=None):
    """`python svf.py --count`: the parameter table of params.py, kept under its old name."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", action="store_true", help="print the parameter counts (python params.py)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    args = ap.parse_args(argv)
    if not args.count:
        ap.error("nothing to do: give --count")
    import params  # only this command needs the table
    params.main(["--model", args.model] if args.model else [])


if __name__ == "__main__":
    main()
