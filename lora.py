"""LoRA (Hu et al. 2021), the baseline of Transformer-Squared's Table 1 and Table 4, around the same model.py.

Every targeted weight W (m, n) gets two trainable matrices, A (r, n) and B (m, r), and the model
computes with

    W' = W + (alpha / r) B A        A ~ N(0, 1/r^2), B = 0: W' = W exactly at the start

Only A and B are trained. The paper's baseline is rank 16 on the attention q and v projections
(targets "qv"); every target set of svf.TARGETS works too, so LoRA can adapt the matrices SVF does.
The wrapper has the shape of svf.SVF (names, parameters(), weights() with autograd, applied(),
state(), expert files), so reinforce.py trains either one with one loop:

    python reinforce.py --task arc --method lora --objective nll    # the paper's LoRA baseline
    python reinforce.py --task arc --method lora                    # LoRA trained with RL (Table 4)
    python evaluate_model.py --task arc_easy --split test --expert runs/arc-lora-nll.safetensors
    python params.py                                                # parameters of every approach

Choices, each a flag of reinforce.py:
- alpha = r by default (`--lora-alpha`), so alpha / r = 1: Hu et al. (section 4.1) set alpha to the
  first r they tried and did not tune it, since with Adam alpha acts like a learning rate. peft's
  LoraConfig defaults (r=8, lora_alpha=8) give the same ratio at its default rank.
- A ~ N(0, (1/r)^2) from a seeded generator, as peft's init_lora_weights="gaussian"; Hu et al.
  draw A from a Gaussian too (loralib and peft's default use Kaiming-uniform instead). B = 0.
- W' is formed as a matrix (in float32, then cast to the weights' dtype), as SVF forms its W', rather
  than computing x W^T + (alpha / r) (x A^T) B^T: the same function, and one code path for both
  methods. In bfloat16 an update smaller than W's rounding step is lost in the forward pass.
- No dropout on the LoRA path (peft's default, lora_dropout=0) and no bias training.
"""

import json
import math
import os
import re

import torch
import torch.nn as nn

import safetensors_io
import svf
from svd_cache import checkpoint_identity, same_checkpoint

LORA_FORMAT = "transformer2-lora/1"


def factor_keys(name):
    """The keys of a weight's two factors in state dicts and files, in peft's naming:
    'model.layers.0.self_attn.q_proj.weight' -> ('...q_proj.lora_A', '...q_proj.lora_B')."""
    stem = name.removesuffix(".weight")
    return f"{stem}.lora_A", f"{stem}.lora_B"


class LoRA(nn.Module):
    """LoRA around a model: one trainable A (r, n) and B (m, r) per targeted weight W (m, n).

    lora.parameters() are the A and B matrices alone (the model is held, not registered, and its own
    weights are frozen). Train with `lora(input_ids)`; infer with `with lora.applied(): ...`.
    """

    def __init__(self, model, identity, targets="qv", rank=16, alpha=None, seed=0):
        super().__init__()
        object.__setattr__(self, "model", model)  # plain attribute: keeps the model out of parameters()
        model.requires_grad_(False)  # autograd must reach A and B and nothing else
        if rank < 1:
            raise ValueError(f"rank={rank}; expected a positive integer")
        self.identity, self.targets, self.rank = identity, targets, int(rank)
        self.alpha = float(rank if alpha is None else alpha)
        self.scaling = self.alpha / self.rank
        self.names = svf.target_names(model, targets)
        # The base weights as they are now, held by reference (no copy): W' is built from them even
        # inside applied(), where the model's own parameters hold W'. (So make the wrapper outside
        # any applied() block: inside one it would take that block's W' for its base.)
        self.base = {name: model.get_parameter(name).detach() for name in self.names}
        g = torch.Generator(device="cpu").manual_seed(seed)  # drawn on the CPU: every device starts alike
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        for name in self.names:
            W = self.base[name]
            m, n = W.shape
            self.A.append(nn.Parameter((torch.randn(self.rank, n, generator=g, device="cpu") / self.rank).to(W.device)))
            self.B.append(nn.Parameter(torch.zeros(m, self.rank, device=W.device)))

    def state(self):
        """{factor key: tensor} detached copies of every A and B (what a LoRA file stores)."""
        out = {}
        for name, A, B in zip(self.names, self.A, self.B):
            key_A, key_B = factor_keys(name)
            out[key_A], out[key_B] = A.detach().clone(), B.detach().clone()
        return out

    @torch.no_grad()
    def load_state(self, state):
        self._check_names(state, "state")
        for name, A, B in zip(self.names, self.A, self.B):
            key_A, key_B = factor_keys(name)
            A.copy_(state[key_A])
            B.copy_(state[key_B])

    def weights(self, state=None):
        """{name: W'} with W' = W + (alpha / r) B A, with autograd to A and B, in the model's dtype.

        state: {factor key: tensor}, e.g. a loaded file's (Expert.p); default the trainable factors.
        """
        if state is None:
            factors = {name: (A, B) for name, A, B in zip(self.names, self.A, self.B)}
        else:
            self._check_names(state, "state")
            factors = {name: tuple(state[k] for k in factor_keys(name)) for name in self.names}
        out = {}
        for name in self.names:
            W = self.base[name]
            A, B = factors[name]
            delta = B.float() @ A.float()  # (m, r) @ (r, n) -> (m, n)
            out[name] = (W.float() + self.scaling * delta).to(W.dtype)  # B = 0: W itself, bit for bit
        return out

    def forward(self, *args, **kwargs):
        """The model's forward with W' in place of the targeted weights; autograd reaches only A and B."""
        return torch.func.functional_call(self.model, self.weights(), args, kwargs)

    def applied(self, weights=None):
        """`with lora.applied():` the model computes with W' (default: from the trainable factors);
        afterwards it holds its original tensors, bit-exactly (svf.swap_weights)."""
        if weights is None:
            with torch.no_grad():
                weights = self.weights()
        return svf.swap_weights(self.model, weights)

    # ------------------------------------------------------------------------- LoRA files

    def save_expert(self, path, state=None, **info):
        """Writes the factors (default: the trainable ones) and metadata atomically as safetensors.

        info: what the training run reports (task, steps, val_accuracy, any JSON-able dict).
        """
        state = self.state() if state is None else state
        self._check_names(state, "state")
        meta = {"format": LORA_FORMAT, "checkpoint": self.identity, "targets": self.targets,
                "rank": str(self.rank), "alpha": repr(self.alpha),
                "parameterisation": json.dumps({"W'": "W + (alpha / rank) B A", "A": "(rank, n)", "B": "(m, rank)"}),
                "shapes": json.dumps({name: list(W.shape) for name, W in self.base.items()}),
                "info": json.dumps(info, default=str)}
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        safetensors_io.save(path, {k: t.detach().float().cpu() for k, t in state.items()}, meta)

    def load_expert(self, path):
        """Reads a LoRA file made for this checkpoint, targets, rank and alpha; raises
        svf.ExpertMismatch naming what differs otherwise (safetensors_io.SafetensorsError for a file
        that is malformed or holds no float32 factors), before anything is copied. Returns an
        svf.Expert whose p holds the factors."""
        tensors, meta = safetensors_io.load(path, dtype=torch.float32, finite=True)
        info = lora_metadata(path, meta)
        differs = []
        if not same_checkpoint(meta["checkpoint"], self.identity):
            differs.append(f"checkpoint: trained for {meta['checkpoint']}, this model is {self.identity}")
        for key, here, read in (("targets", self.targets, str), ("rank", self.rank, int), ("alpha", self.alpha, float)):
            if read(meta[key]) != here:
                differs.append(f"{key}: the file has {read(meta[key])!r}, this wrapper {here!r}")
        if differs:
            raise svf.ExpertMismatch(f"{path} does not fit this LoRA wrapper: " + "; ".join(differs)
                                     + ". (lora.load_adapter_for builds the wrapper the file asks for.)")
        self._check_names(tensors, f"LoRA file {path}")
        self._check_range(tensors, path)
        device = self.A[0].device
        return svf.Expert({k: t.to(device, copy=True) for k, t in tensors.items()}, info, path)

    def _check_range(self, factors, path):
        """Finite factors can still make W' = W + (alpha / r) B A overflow the weights' dtype (inf, then
        NaN logits). |(B A)_ij| <= r max|B| max|A| bounds every entry, so a file within the bound is safe;
        one beyond it is refused, naming the factors."""
        for name, W in self.base.items():
            key_A, key_B = factor_keys(name)
            A, B = factors[key_A].abs().max().item(), factors[key_B].abs().max().item()
            bound = self.rank * abs(self.scaling) * B * A + W.abs().max().item()
            if not bound < torch.finfo(W.dtype).max:
                raise svf.ExpertMismatch(f"{path}: tensors {key_A!r} and {key_B!r} hold entries so large that "
                                         f"W + (alpha / r) B A may overflow {W.dtype} (bound {bound:.3g}); "
                                         f"expected factors whose update stays finite")

    def _check_names(self, tensors, what):
        expected = {}
        for name, W in self.base.items():
            key_A, key_B = factor_keys(name)
            expected[key_A], expected[key_B] = (self.rank, W.shape[1]), (W.shape[0], self.rank)
        found = {k: tuple(t.shape) for k, t in tensors.items()}
        if found != expected:
            diff = sorted(set(found.items()) ^ set(expected.items()))[:4]
            raise svf.ExpertMismatch(f"{what} does not fit rank {self.rank} on targets {self.targets!r} of "
                                     f"{self.identity}: shapes (key, shape) differing from those expected: {diff}")


def lora_metadata(path, meta):
    """The `info` of a LoRA file's metadata, after checking its format and that its targets, rank and
    alpha are what a LoRA file holds; svf.ExpertMismatch naming the file and what was found otherwise."""
    if meta.get("format") == svf.EXPERT_FORMAT:
        raise svf.ExpertMismatch(f"{path} is an SVF expert file, not a LoRA file; load it with "
                                 f"lora.load_adapter_for, which reads either kind")
    info = svf.expert_metadata(path, meta, LORA_FORMAT, keys=("checkpoint", "targets", "rank", "alpha", "info"))
    # ASCII digits only: str.isdigit() also accepts "¹" (which int() refuses) and "١٦" (which int() reads
    # as 16); at most 12 of them, as int() refuses strings of thousands of digits.
    if not re.fullmatch(r"[0-9]{1,12}", meta["rank"]) or int(meta["rank"]) < 1:
        raise svf.ExpertMismatch(f"{path}: rank {meta['rank'][:40]!r}; expected a positive integer written in "
                                 f"ASCII digits 0-9")
    try:
        alpha = float(meta["alpha"])
    except ValueError:
        alpha = math.nan
    if not math.isfinite(alpha):
        raise svf.ExpertMismatch(f"{path}: alpha {meta['alpha']!r}; expected a finite number")
    return info


def check_shapes(path, header, model, targets, rank):
    """Refuses, before any wrapper allocates its factors, a file whose A and B are not (rank, n) and
    (m, rank) for the model's targeted weights (m, n): the rank in the metadata sizes the allocation."""
    expected = {}
    for name in svf.target_names(model, targets):
        m, n = model.get_parameter(name).shape
        key_A, key_B = factor_keys(name)
        expected[key_A], expected[key_B] = (rank, n), (m, rank)
    found = {key: tuple(info["shape"]) for key, info in header.items()}
    if found != expected:
        diff = sorted(set(found.items()) ^ set(expected.items()), key=str)[:4]
        raise svf.ExpertMismatch(f"{path}: its factors do not fit rank {rank} on targets {targets!r} of this model: "
                                 f"(key, shape) differing from those expected: {diff}")


def load_adapter_for(model, model_dir, path, **svf_kwargs):
    """(wrapper, Expert) for a single expert file of either kind, SVF or LoRA, told apart by the
    format in its header; the file's tensors are loaded into the wrapper, so `with wrapper.applied():`
    applies it. svf_kwargs (impl, use_cache, log) go to svf.SVF; LoRA needs none of them.
    Refuses, with svf.ExpertMismatch, a file of neither kind or one made for another checkpoint; a
    LoRA file's header is checked in full before the wrapper is made."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"expert file {path} does not exist (train one with reinforce.py)")
    header, meta, _ = safetensors_io.read_header(path)
    if meta.get("format") == svf.EXPERT_FORMAT:
        wrapper, expert = svf.load_expert_for(model, model_dir, path, **svf_kwargs)
    elif meta.get("format") == LORA_FORMAT:
        lora_metadata(path, meta)
        identity = checkpoint_identity(model_dir)
        if not same_checkpoint(meta["checkpoint"], identity):
            raise svf.ExpertMismatch(f"{path}: trained for checkpoint {meta['checkpoint']}, this model is {identity}")
        check_shapes(path, header, model, meta["targets"], int(meta["rank"]))
        wrapper = LoRA(model, identity, meta["targets"], int(meta["rank"]), float(meta["alpha"]))
        expert = wrapper.load_expert(path)
    else:
        raise svf.ExpertMismatch(f"{path}: format {meta.get('format')!r}; expected an SVF expert "
                                 f"({svf.EXPERT_FORMAT!r}) or a LoRA file ({LORA_FORMAT!r}), as reinforce.py writes")
    wrapper.load_state(expert.p)
    return wrapper, expert
