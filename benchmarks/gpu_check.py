"""One command for a GPU: the CUDA kernel, and the whole pipeline on CUDA against the same calls on the CPU.

    python -m benchmarks.gpu_check                  # on a machine with a GPU: a few minutes, no download
    python -m benchmarks.gpu_check --device cpu     # the same checks as a dry run on the CPU (the reference path)

It needs torch, numpy, tiktoken and pytest, and nothing else: it writes its own tiny random
checkpoints, since a short-lived GPU machine may have no way to fetch or receive the default model.
It prints one table and exits 1 if any row fails. The rows:

    kernel      svf_recompose.cu against a float64 reference: W = U diag(s) Vh and grad_s, float32 and
                bfloat16, odd shapes and the default model's
    speed       the kernel's time against cuBLAS's (U * s) @ Vh, the default model's and Llama-3-8B's MLP
                shapes (random factors); the aim is within 1.5x of cuBLAS at the 8B shapes (not a failure)
    pipeline    logits, greedy tokens, a REINFORCE step's gradient of p, an evaluation batch, a CEM
                generation and a two-pass adapt.py question on the device, each against the CPU. Greedy
                tokens must be equal wherever the top-two logit margin exceeds the tolerance (where it
                does not, the two devices may break a near-tie differently, and both are right)
    tests       pytest -q tests/test_svf.py, whose kernel tests run where there is a GPU
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import cem
import reinforce
import safetensors_io
import svf
from adapt import AdaptConfig, Adapter
from benchmarks.bench_svf import median_time
from chat import Completer, resolve_device
from data import evaluate
from data.task import Example, Task
from model import ModelConfig, Transformer, load_model
from objectives import policy_gradient_step
from tokenizer import GPT2_PATTERN, Tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_type="llama", vocab_size=259, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, rope_theta=10000.0,
            max_position_embeddings=512, tie_word_embeddings=True, hidden_act="silu")
KERNEL_SHAPES = [("odd", 37, 29, 53), ("odd, r > n", 129, 67, 31), ("SmolLM2 gate/up", 1536, 576, 576),
                 ("SmolLM2 down", 576, 576, 1536)]
SPEED_SHAPES = [("SmolLM2 gate/up", 1536, 576, 576), ("SmolLM2 down", 576, 576, 1536),
                ("Llama-3-8B gate/up", 14336, 4096, 4096), ("Llama-3-8B down", 4096, 4096, 14336)]
TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2}  # relative to the largest entry, against float64
quiet = lambda *a, **k: None  # noqa: E731


class Table:
    def __init__(self):
        self.rows = []

    def add(self, group, check, status, detail):
        self.rows.append((group, check, status, detail))
        print(f"  {group:9} {check:50} {status:5} {detail}", flush=True)

    def failed(self):
        return [r for r in self.rows if r[2] == "FAIL"]


def write_tiny_checkpoint(path, seed=0):
    """config.json + model.safetensors of a random Llama with weights large enough for clear logits."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_hf(TINY))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.1 + ("norm" in name))
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    os.makedirs(path, exist_ok=True)
    safetensors_io.save(os.path.join(path, "model.safetensors"), state, {"format": "pt"})
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY, f)
    return path


def byte_tokenizer():
    special = {"<|endoftext|>": 256, "<|im_start|>": 257, "<|im_end|>": 258}
    return Tokenizer({bytes([b]): b for b in range(256)}, special, GPT2_PATTERN,
                     {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})


class LowByteTask(Task):
    """Right when the first character's code point is even: a task with a scorer and no data files."""
    name, prompts, default_prompt = "lowbyte", {"plain": None}, "plain"

    def load(self, split):
        return [Example(f"lowbyte/{split}/{i}", f"word {i}", [{"role": "user", "content": f"word {i}"}], True)
                for i in range(16)]

    def extract(self, output, example=None):
        return output[:1] or None

    def is_correct(self, answer, example):
        return ord(answer) % 2 == 0


# ----------------------------------------------------------------------------- the kernel

def relative_error(a, b):
    return float((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-30))


def check_kernel(table, device):
    impl = svf.resolve_impl("auto", torch.empty(1, device=device))
    g = torch.Generator(device="cpu").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        for label, m, r, n in KERNEL_SHAPES:
            U, s, Vh, G = (torch.randn(*shape, generator=g, device="cpu") for shape in ((m, r), (r,), (r, n), (m, n)))
            U, s, Vh, G = (t.to(dtype) for t in (U, s.abs() + 0.1, Vh, G))
            W64 = (U.double() * s.double()) @ Vh.double()  # the references, from the same rounded inputs
            grad64 = ((G.double() @ Vh.double().T) * U.double()).sum(0)
            Ud, sd, Vd, Gd = (t.to(device) for t in (U, s, Vh, G))
            sd = sd.float().requires_grad_(True)
            W = svf.recompose(Ud, sd, Vd, impl)
            W.backward(Gd.to(W.dtype))
            err, gerr = relative_error(W.detach().cpu(), W64), relative_error(sd.grad.cpu(), grad64)
            tol = TOL[dtype] * (10 if dtype == torch.float32 else 2)  # grad_s sums m * n products
            ok = err <= TOL[dtype] and gerr <= tol
            table.add("kernel", f"{impl} {str(dtype)[6:]} {label} ({m}, {r}, {n})", "ok" if ok else "FAIL",
                      f"W {err:.1e} (tol {TOL[dtype]:.0e}), grad_s {gerr:.1e} (tol {tol:.0e})")


def median_ms(fn, device, runs=20):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    fn(), sync()  # warm-up: first-use costs of cuBLAS and the kernel
    return median_time(fn, runs, sync) * 1e3


def check_speed(table, device):
    if device.type != "cuda":
        table.add("speed", "kernel against cuBLAS", "skip", "needs a GPU")
        return
    kernel = svf.load_kernel()
    for dtype in (torch.float32, torch.bfloat16):
        for label, m, r, n in SPEED_SHAPES:
            U, s, Vh = (torch.randn(m, r, device=device, dtype=dtype), torch.rand(r, device=device, dtype=dtype),
                        torch.randn(r, n, device=device, dtype=dtype))
            G = torch.randn(m, n, device=device, dtype=dtype)
            k, c = median_ms(lambda: kernel.recompose(U, s, Vh), device), median_ms(lambda: (U * s) @ Vh, device)
            kb, cb = (median_ms(lambda: kernel.grad_s(G, U, Vh), device),
                      median_ms(lambda: ((G @ Vh.mT) * U).sum(0), device))
            note = "" if "8B" not in label or k <= 1.5 * c else "  (above the 1.5x aim)"
            table.add("speed", f"{str(dtype)[6:]} {label} ({m}, {r}, {n})", "info",
                      f"forward {k:.3f} ms / cuBLAS {c:.3f} ms = {k / c:.2f}x; grad_s {kb:.3f} / {cb:.3f} ms "
                      f"= {kb / cb:.2f}x{note}")
            del U, s, Vh, G


# ----------------------------------------------------------------------------- the pipeline, device against CPU

class Pair:
    """The same tiny model, tokenizer and experts on the CPU and on the device under test."""

    def __init__(self, path, device, experts):
        self.tok, self.path = byte_tokenizer(), path
        self.cpu, _ = load_model(path, device="cpu")
        self.dev, _ = load_model(path, device=device)
        self.experts = experts

    def diverge_ok(self, prompt, a, b, tol):
        """True if token lists a and b (CPU, device) are equal, or first differ where the CPU's
        top-two margin is within tol (a near-tie either device may break either way)."""
        if a == b:
            return True
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        with torch.no_grad():
            top2 = self.cpu(torch.tensor([prompt + a[:i]], device="cpu"))[0, -1].float().topk(2).values
        return float(top2[0] - top2[1]) <= tol


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def check_pipeline(table, pair, tol=1e-3):
    tok, task = pair.tok, LowByteTask()
    examples = task.load("test")
    prompts = [tok.chat(ex.messages) for ex in examples]
    # logits
    ids = torch.tensor([prompts[0] + list(range(40))])
    with torch.no_grad():
        a, b = pair.cpu(ids), pair.dev(ids.to(pair.dev.inv_freq.device)).cpu()
    err = relative_error(b, a.double())
    table.add("pipeline", "logits (1, 54) float32", "ok" if err <= 1e-4 else "FAIL", f"relative error {err:.1e} (tol 1e-04)")
    # greedy generation and one evaluation batch
    comp = {k: Completer(m, tok, 24, batch_size=16) for k, m in (("cpu", pair.cpu), ("dev", pair.dev))}
    (ga, ta), (gb, tb) = timed(lambda: comp["cpu"].generate_ids(prompts)), timed(lambda: comp["dev"].generate_ids(prompts))
    same = sum(x == y for x, y in zip(ga, gb))
    ok = all(pair.diverge_ok(p, x, y, tol) for p, x, y in zip(prompts, ga, gb))
    table.add("pipeline", "greedy tokens, 16 prompts x 24", "ok" if ok else "FAIL",
              f"{same}/16 equal, the rest at near-ties; device {tb:.2f}s, CPU {ta:.2f}s")
    complete = {k: (lambda c: lambda msgs: [tok.decode(x) for x in c.generate_ids([c.encode(m) for m in msgs])])(c)
                for k, c in comp.items()}
    (ra, ta), (rb, tb) = (timed(lambda k=k: evaluate(task, examples, complete[k], batch_size=16, progress=False))
                          for k in ("cpu", "dev"))
    ok = ra.correct == rb.correct or same < 16  # equal tokens must score alike
    table.add("pipeline", "evaluation batch (data.evaluate)", "ok" if ok else "FAIL",
              f"accuracy {rb.accuracy:.3f} on the device, {ra.accuracy:.3f} on the CPU; {tb:.2f}s / {ta:.2f}s")
    # one REINFORCE step: rollouts on each device, then the gradient of p on the CPU's rollouts, both devices
    cfg = reinforce.TrainConfig(task="lowbyte", targets="mlp", batch_size=16, micro_batch=8, baseline=True, kl=0.1)
    grads, times = [], []
    for model in (pair.cpu, pair.dev):
        wrapper = svf.SVF(model, svf.checkpoint_identity(pair.path), "mlp", use_cache=False, log=quiet)
        rewards = [1.0 if i % 3 == 0 else -1.0 for i in range(16)]
        _, t = timed(lambda: policy_gradient_step(wrapper, model, prompts, ga, rewards, cfg, tok.pad_id))
        grads.append(torch.cat([p.grad.cpu() for p in wrapper.parameters()]))
        times.append(t)
    err = relative_error(grads[1], grads[0].double())
    table.add("pipeline", "REINFORCE step, gradient of p (KL 0.1)", "ok" if err <= tol else "FAIL",
              f"relative error {err:.1e} (tol {tol:.0e}); device {times[1]:.2f}s, CPU {times[0]:.2f}s")
    # one CEM generation over the three experts, scored on 4 shots
    keys, times = [], []
    for model in (pair.cpu, pair.dev):
        wrapper, experts = cem.load_experts(model, pair.path, pair.experts[:3], log=quiet, use_cache=False)
        fitness = cem.ShotFitness(wrapper, experts, task, examples[:4], Completer(model, tok, 8, batch_size=4))
        _, t = timed(lambda: cem.cem(fitness, 3, population=4, generations=1, init_mean=1 / 3, seed=0, log=quiet))
        keys.append([f for _, f, _ in fitness.evaluated])
        times.append(t)
    ok = all(x == y or (x[0] == y[0] and abs(x[1] - y[1]) <= tol) for x, y in zip(*keys))  # -inf: an invalid member
    table.add("pipeline", "CEM generation (4 members, 4 shots)", "ok" if ok else "FAIL",
              f"fitness (accuracy, log-likelihood) equal within {tol:.0e}: {ok}; device {times[1]:.2f}s, CPU {times[0]:.2f}s")
    # a two-pass adapt.py question: pass 1 classifies under the cls expert, pass 2 answers under W'
    routes, outs, times = [], [], []
    question = "Write a Python function that reverses a list."
    for model in (pair.cpu, pair.dev):
        files = dict(zip(("code_expert", "math_expert", "reasoning_expert", "cls_expert"), pair.experts))
        adapter = Adapter(model, tok, pair.path, AdaptConfig(strategy="cls", batch_size=1, **files),
                          log=quiet, use_cache=False)
        c = Completer(model, tok, 16, batch_size=1)

        def two_passes():
            choice = adapter.choose([question])
            return choice, adapter.answer([c.encode([{"role": "user", "content": question}])], choice, c)[0]
        (choice, out), t = timed(two_passes)
        routes.append(choice[0]), outs.append(out), times.append(t)
    ok = routes[0] == routes[1] and pair.diverge_ok(c.encode([{"role": "user", "content": question}]), *outs, tol)
    table.add("pipeline", "adapt.py question, strategy cls", "ok" if ok else "FAIL",
              f"pass 1 chose {routes[1]!r} (CPU {routes[0]!r}); device {times[1]:.2f}s, CPU {times[0]:.2f}s")


def check_bfloat16_step(table, path, device):
    model, _ = load_model(path, dtype=torch.bfloat16, device=device)
    tok = byte_tokenizer()
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", use_cache=False, log=quiet)
    prompts = [tok.chat(ex.messages) for ex in LowByteTask().load("test")[:8]]
    cfg = reinforce.TrainConfig(task="lowbyte", batch_size=8, micro_batch=8, baseline=True)
    policy_gradient_step(wrapper, model, prompts, [[65, 66]] * 8, [1.0, -1.0] * 4, cfg, tok.pad_id)
    factors = {str(f.U.dtype)[6:] for f in wrapper.factors}
    ok = factors == {"bfloat16"} and all(p.dtype == torch.float32 and torch.isfinite(p.grad).all()
                                         for p in wrapper.parameters())
    table.add("pipeline", "bfloat16 step: factors bf16, p and grad fp32", "ok" if ok else "FAIL",
              f"factors {factors}, recomposition {svf.resolve_impl('auto', wrapper.factors[0].U)}")


def check_tests(table):
    import checkpoints
    cmd = ["pytest", "-q", "tests/test_svf.py"]
    if not os.path.exists(os.path.join(checkpoints.cache_dir(), checkpoints.MODEL_NAME, "config.json")):
        cmd += ["-k", "not default_model"]  # the one test of the default model, which this machine lacks
    proc = subprocess.run([sys.executable, "-m", *cmd], cwd=ROOT, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["no output"])[-1]
    table.add("tests", " ".join(cmd), "ok" if proc.returncode == 0 else "FAIL", last)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-2000:])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda or cuda:N")
    ap.add_argument("--no-tests", action="store_true", help="leave out the pytest row")
    args = ap.parse_args(argv)
    device = resolve_device(args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "the CPU (a dry run: no kernel)"
    print(f"gpu_check on {device}: {where}; torch {torch.__version__}, CUDA {torch.version.cuda}")
    table, t0 = Table(), time.perf_counter()
    cache = os.environ.get("T2_CACHE_DIR")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["T2_CACHE_DIR"] = tmp  # no SVD cache left behind
        if device.type == "cuda":
            try:
                _, t = timed(svf.load_kernel)
                table.add("kernel", "build kernels/svf_recompose.{cpp,cu}", "ok", f"{t:.1f}s (cached by torch after)")
            except RuntimeError as e:
                table.add("kernel", "build kernels/svf_recompose.{cpp,cu}", "FAIL", str(e)[:200])
        check_kernel(table, device)
        check_speed(table, device)
        path = write_tiny_checkpoint(os.path.join(tmp, "tiny"))
        experts = []
        wrapper = svf.SVF(load_model(path)[0], svf.checkpoint_identity(path), "mlp", use_cache=False, log=quiet)
        for k, name in enumerate(("code", "math", "reasoning", "cls")):
            g = torch.Generator(device="cpu").manual_seed(k)
            p = {n: 2 * torch.randn(len(f.sigma), generator=g) for n, f in zip(wrapper.names, wrapper.factors)}
            experts.append(os.path.join(tmp, f"{name}.safetensors"))
            wrapper.save_expert(experts[-1], p, task=name, prompt="plain" if name != "cls" else None)
        check_pipeline(table, Pair(path, device, experts))
        check_bfloat16_step(table, path, device)
    if cache is None:
        os.environ.pop("T2_CACHE_DIR")
    else:
        os.environ["T2_CACHE_DIR"] = cache
    if not args.no_tests:
        check_tests(table)
    failed = table.failed()
    print(f"{len(table.rows)} rows, {len(failed)} failed, {time.perf_counter() - t0:.0f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
