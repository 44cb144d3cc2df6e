"""From a checkpoint to the tasks: chat prompts in, completions out, and the flags every script shares.

The data flows checkpoint -> model.py (+ tokenizer.py) -> chat.py -> data/ (tasks, scorers):

    model, tok, model_dir = load(args)                 # from --model / --dtype / --device (add_model_arguments)
    complete = Completer(model, tok, max_new_tokens=64)
    complete([[{"role": "user", "content": "What is 2 + 3?"}]])   # -> ["2 + 3 = 5."]

`Completer` renders chat messages with the checkpoint's template and generates with generate.generate;
it is the `complete_fn` of data.evaluate. evaluate_model.py, reinforce.py, cem.py and adapt.py use it.

    python chat.py --prompt "What is the capital of France?"   # talk to a checkpoint (--model DIR)

`python model.py --prompt ...` and `python generate.py --prompt ...` run this command line too.
"""

import argparse
import ctypes
import os
import resource
import time
import warnings

import torch

import checkpoints
from data import add_data_dir_argument, get_task
from generate import generate
from model import load_model
from products import bfloat16_features, native_bfloat16
from tokenizer import Tokenizer

# Generation budget per task: enough for the prompt formats in data/ (a letter and the option's
# text for ARC, a worked solution for math, a function for code) and not much more.
MAX_NEW_TOKENS = {"arc_easy": 32, "arc_challenge": 32, "cls": 16, "gsm8k": 320, "math": 512,
                  "math500": 512, "mbpp": 320, "humaneval": 384}


def prompt_ids(tok, messages):
    """The ids of a task's prompt. A final assistant message is a prefill: continued, no end of turn
    after it. A template that takes no system message (Mistral v0.1) gets the task's system text in
    the first user turn."""
    return tok.chat(messages, fold_system_message="auto", continue_final_message=messages[-1]["role"] == "assistant")


def completion_ids(tok, messages, completion):
    """The ids of `completion` as the checkpoint's template renders it after the prompt of `messages`
    (continuing its prefill, else as the assistant's answer): the rendering of prompt and completion
    together, less the prompt's ids. Encoding the completion alone can differ at the seam: a
    SentencePiece-style BPE (Mistral) puts a "▁" before a piece of its own, where Hugging Face
    tokenizes "[/INST]" and the answer as one piece. Where the prompt's ids are not a prefix of the
    whole's (a template that renders an answer differently from a prompt, e.g. Qwen3's think block),
    the completion alone, continuing the text."""
    prompt = prompt_ids(tok, messages)
    if messages[-1]["role"] == "assistant":
        whole = [*messages[:-1], {"role": "assistant", "content": messages[-1]["content"] + completion}]
    else:
        whole = [*messages, {"role": "assistant", "content": completion}]
    ids = tok.chat(whole, fold_system_message="auto", continue_final_message=True)
    return ids[len(prompt):] if ids[:len(prompt)] == prompt else tok.encode(completion, at_start=False)


class Completer:
    """complete_fn for data.evaluate: list of chat message lists -> list of completions.

    A message list that ends with an assistant message is a prefill: the completion continues it.
    Prompts are generated in batches of `batch_size`, sorted by length so that little is padding.
    """

    def __init__(self, model, tok, max_new_tokens=64, temperature=0.0, top_p=1.0, batch_size=16, seed=0):
        self.model, self.tok = model, tok
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size = batch_size
        # sampling draws on the model's device, so the generator lives there too (seeded: a CUDA run
        # is reproducible on the same GPU as a CPU run is on the CPU, though the two draw differently)
        self.generator = torch.Generator(device=model.inv_freq.device).manual_seed(seed)

    def encode(self, messages):
        return prompt_ids(self.tok, messages)

    def generate_ids(self, prompts, samples=1, keep_stop=False):
        """prompts: list of token lists -> list of generated token lists (stop token excluded unless
        `keep_stop`). `samples` K: K answers to each prompt, prompt after prompt, from one prefill
        per prompt (generate.generate); batches then hold batch_size // K prompts, batch_size answers."""
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [None] * (len(prompts) * samples)
        per_batch = max(self.batch_size // samples, 1)
        for start in range(0, len(order), per_batch):
            idx = order[start:start + per_batch]
            new = generate(self.model, [prompts[i] for i in idx], self.max_new_tokens, self.temperature,
                           self.top_p, self.tok.stop_tokens, self.tok.pad_id, self.generator,
                           samples=samples, keep_stop=keep_stop)
            for j, ids in enumerate(new):
                out[idx[j // samples] * samples + j % samples] = ids
        release_freed_memory()
        return out

    def __call__(self, message_lists):
        return [self.tok.decode(ids) for ids in self.generate_ids([self.encode(m) for m in message_lists])]


def release_freed_memory():
    """Gives the memory freed since the last call back to the operating system, where the C library
    is glibc. glibc keeps freed blocks in its heaps for reuse, and after a generation those are the
    KV caches and packed weights, 1.1 GB of the 3.0 GB a 64-row ARC generation left resident in
    float32; a REINFORCE step then builds its backward on top of them, so its peak was the sum
    (RESULTS.md, "The official batch"). malloc_trim(0) returns them; elsewhere this does nothing."""
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL("libc.so.6")
            _libc.malloc_trim  # noqa: B018 (glibc only)
        except (OSError, AttributeError):
            _libc = False
    if _libc:
        _libc.malloc_trim(0)


_libc = None


def peak_rss_gib():
    """This process's peak resident memory so far, in GiB (Linux reports KiB). ru_maxrss is the
    kernel's high-water mark, which reset_peak_rss resets too: the peaks before a reset are kept here."""
    return max(_peak_before_reset, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20)


_peak_before_reset = 0.0


# peak_rss_gib is a high-water mark: a step longer than any before raises it with no leak at all, so
# growth and peaks cannot be told apart by it. Two more readings tell them apart (issue 38): the
# resident memory now, after a step's release, and the step's own peak.

def rss_gib():
    """This process's resident memory now, in GiB (/proc/self/statm); None where there is no /proc."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return None


def reset_peak_rss():
    """Starts a new high-water mark, so that peak_rss_since_reset_gib reads the peak of what follows
    (one step): on Linux, "5" written to /proc/self/clear_refs resets VmHWM (and ru_maxrss with it:
    the process's peak so far is kept for peak_rss_gib first). Returns whether it could."""
    global _peak_before_reset
    _peak_before_reset = peak_rss_gib()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_since_reset_gib():
    """The peak resident memory since reset_peak_rss, in GiB (VmHWM of /proc/self/status); where
    that cannot be read or reset, the process's peak so far (peak_rss_gib)."""
    try:
        with open("/proc/self/status") as f:
            hwm = next(line for line in f if line.startswith("VmHWM:"))
        return int(hwm.split()[1]) / 2**20  # kB
    except (OSError, StopIteration, ValueError, IndexError):
        return peak_rss_gib()


def add_model_arguments(ap, batch_size=16, batch_help="prompts generated together"):
    """The flags every script shares for choosing and running a checkpoint (reinforce.py gives
    --batch-size its own meaning, rollouts per step, and the recipe's default)."""
    ap.add_argument("--model", default=None, help="Hugging Face checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="weights and SVF factors; p, the optimiser and the loss stay float32. auto: bfloat16 where "
                         "the device runs it natively (a CUDA GPU of compute capability 8.0 or more, a CPU with "
                         "avx512_bf16 or amx_bf16), else float32 (default: %(default)s)")
    ap.add_argument("--device", default="auto", type=device_arg,
                    help="auto (CUDA when available, else the CPU), cpu, cuda or cuda:N (default: %(default)s)")
    ap.add_argument("--batch-size", type=int, default=batch_size, help=batch_help)
    add_data_dir_argument(ap)


DTYPES = ("auto", "float32", "bfloat16")


def auto_dtype(device):
    """(dtype name, why) that --dtype auto means on `device`: bfloat16 where its matrix products run
    natively, float32 elsewhere. Without native kernels bfloat16 is emulated and slow: on an AMD EPYC
    with AVX2 only, step 0's 600-item ARC validation took 836 s in bfloat16 against 130 s in float32
    (issue 38); with avx512_bf16 bfloat16 is the faster (RESULTS.md, "Speed") and holds half the memory."""
    device = torch.device(device)
    if device.type == "cuda":
        gpu, (major, minor) = torch.cuda.get_device_name(device), torch.cuda.get_device_capability(device)
        if major >= 8:  # Ampere and later: bfloat16 tensor cores
            return "bfloat16", f"{gpu}, compute capability {major}.{minor}, runs it natively"
        return "float32", f"{gpu}, compute capability {major}.{minor}, has no native bfloat16 (8.0 and up have)"
    if native_bfloat16():
        return "bfloat16", f"this CPU has {' and '.join(bfloat16_features()) or 'native bfloat16 products'}"
    limits = [f"{v}={os.environ[v]}" for v in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY") if v in os.environ]
    if limits and bfloat16_features():
        return "float32", f"this CPU's {' and '.join(bfloat16_features())} turned off by {' '.join(limits)}"
    return "float32", "this CPU has no native bfloat16: no avx512_bf16 or amx_bf16"


def resolve_dtype(args):
    """args.dtype with "auto" replaced, in args, by what it means on args.device (auto_dtype), said
    once: the first call prints "dtype auto: bfloat16 (this CPU has avx512_bf16)", later ones find
    the name already resolved. Returns the name ("float32" or "bfloat16")."""
    if args.dtype == "auto":
        args.dtype, why = auto_dtype(resolve_device(getattr(args, "device", "auto")))
        print(f"dtype auto: {args.dtype} ({why}); --dtype float32 or bfloat16 to choose", flush=True)
    return args.dtype


def resolve_device(name="auto"):
    """--device's value -> a torch.device: "auto" is the first GPU when CUDA is available, else the
    CPU. Raises ValueError, saying what is there, for a device this machine does not have."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device {name!r}; expected auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {name!r}; expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            why = "torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ValueError(f"device {name!r}, but {why} (torch {torch.__version__}); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r}, but this machine has {torch.cuda.device_count()} CUDA "
                             f"device(s): cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def device_arg(name):
    """argparse type of --device: checks the name now (a clear error before anything loads)."""
    try:
        return str(resolve_device(name)) if name != "auto" else name
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def load(args):
    """(model, tokenizer, model_dir) from the shared flags, the model on --device."""
    path = checkpoints.resolve_model(args.model)
    device = resolve_device(getattr(args, "device", "auto"))
    resolve_dtype(args)
    if args.dtype == "bfloat16" and device.type == "cpu" and not native_bfloat16():
        warnings.warn("--dtype bfloat16 on a CPU without native bfloat16 (AVX-512-BF16 or AMX): its matrix "
                      "products fall back to generic loops, and on an AVX2-only CPU prefill ran 6.6 times, "
                      "decoding 16 to 64 rows 4 to 7 times and a forward and backward 12 times slower "
                      "than in float32 (RESULTS.md, \"Speed\"); --dtype float32 is the faster here", stacklevel=2)
    model, _ = load_model(path, dtype=getattr(torch, args.dtype), device=device)
    if device.type == "cuda":
        print(f"model on {device} ({torch.cuda.get_device_name(device)}), {args.dtype}")
    return model, Tokenizer.from_dir(path), path


def choose_prompt(task_name, prompt=None, info=None):
    """The prompt given (--prompt), else the one an expert was trained with (`info`, svf.file_info),
    where the task has a prompt of that name: an expert answers best in the format it learned.
    None means the task's default."""
    if prompt is not None:
        return prompt
    trained = (info or {}).get("prompt")
    return trained if trained in get_task(task_name).prompts else None


def main():
    """Talk to a checkpoint: `python chat.py --prompt ...`, also typed as `python model.py` or
    `python generate.py`, which run this (runpy) without importing it."""
    ap = argparse.ArgumentParser(description="Chat with a Llama-family checkpoint.")
    ap.add_argument("--model", default=None, help="Hugging Face checkpoint dir (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--prompt", default="What is the capital of France?")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="auto", choices=DTYPES,
                    help="auto: bfloat16 where the device runs it natively, else float32 (auto_dtype)")
    ap.add_argument("--device", default="auto", type=device_arg,
                    help="auto (CUDA when available), cpu, cuda or cuda:N")
    args = ap.parse_args()

    model, tok, _ = load(args)  # as every script loads (--dtype auto resolved, a warning where bfloat16 would be slow)
    device = model.lm_head.weight.device
    prompt = tok.chat([{"role": "user", "content": args.prompt}])
    t0 = time.perf_counter()
    new = generate(model, [prompt], args.max_new_tokens, args.temperature, args.top_p, tok.stop_tokens,
                   tok.pad_id, torch.Generator(device=device).manual_seed(args.seed))[0]
    dt = time.perf_counter() - t0
    print(tok.decode(new))
    print(f"[{len(prompt)} prompt tokens, {len(new)} new tokens in {dt:.2f}s, {len(new) / dt:.1f} tokens/s]")


if __name__ == "__main__":
    main()
