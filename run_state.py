"""Training-state files: what `reinforce.py --resume` and `cem.py --resume` read back (state.pt).

    state = run_state.load_state("runs/arc/state.pt", "reinforce")   # or "cem"
    run_state.save_state(state, "runs/arc/state.pt", "reinforce")    # atomic; records the kind

A state is tensors, numbers, strings, None, and lists, tuples and dicts of them: the weights, Adam's
moments, a random generator's state (a uint8 tensor), counters and the run's config. So it is read
with `torch.load(weights_only=True)`, whose unpickler builds nothing else: a state file that carries
a pickled object (whose unpickling would run code of the file's choosing) is refused, and so is a
truncated or damaged file and a state of the other kind, each with an error naming the file, what
was expected and what was found. Nothing is loaded into the run before the whole file is read.

Which kind a state is: its "kind" field where it has one (save_state writes it), else its keys, so that
states written before the field existed still resume; a state with the other kind's keys is refused.

The values a resume relies on are checked too, each refusal naming state.pt: the step (or generation)
a non-negative int, reinforce's expert vectors dicts of finite float tensors, cem's distribution
finite float vectors. What needs the run to check, load_vectors (p's shapes against the expert) and
log_until (the step within log.jsonl), is here as well. A path that is not a regular file (a FIFO,
which open() would wait on forever) is refused before it is opened (safetensors_io.open_regular).
"""

import json
import os
import pickle
import zipfile

import torch

from safetensors_io import open_regular

# The keys each kind must have (a state may have more: a newer version of the script writes them).
KEYS = {"reinforce": {"p", "optimizer", "step", "best", "generator", "config", "model_dir"},
        "cem": {"generation", "mean", "std", "best", "fitness", "rng", "history", "config", "experts"}}
WRITERS = {"reinforce": "reinforce.py", "cem": "cem.py"}


class StateFileError(ValueError):
    pass


def save_state(obj, path, kind):
    """torch.save of {**obj, "kind": kind}, atomically: to a temporary file in the same folder, flushed
    to disk, then renamed over `path`, so a run killed while saving leaves the previous state whole."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        torch.save({**obj, "kind": kind}, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_state(path, kind):
    """The state of a `kind` run ("reinforce" or "cem") saved at `path`, on the CPU (a GPU run's state
    resumes anywhere); StateFileError naming the file and the problem if it is not one."""
    if kind not in KEYS:
        raise ValueError(f"kind={kind!r}; expected one of {sorted(KEYS)}")
    try:
        with open_regular(path, StateFileError, f"{kind} training state written by torch.save") as f:
            state = torch.load(f, weights_only=True, map_location="cpu")
    except StateFileError:
        raise
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise StateFileError(f"{path}: expected a {kind} training state of tensors, numbers, strings, lists and "
                             f"dicts; found other objects, which are not loaded, since unpickling them would run "
                             f"code the file chooses ({first})") from None
    except (RuntimeError, OSError, EOFError, zipfile.BadZipFile, ValueError) as e:
        raise StateFileError(f"{path}: cannot be read as a {kind} training state written by torch.save "
                             f"({type(e).__name__}: {e}); is it truncated or damaged? Restart the run without "
                             f"--resume, or with another --run-dir") from None
    if not isinstance(state, dict):
        raise StateFileError(f"{path}: expected a {kind} training state (a dict), found a {type(state).__name__}")
    found = state.get("kind")
    if found is None:
        found = next((other for other, keys in KEYS.items() if other != kind and keys <= state.keys()
                      and not KEYS[kind] <= state.keys()), kind)
    if found != kind:
        raise StateFileError(f"{path}: expected the state of a {WRITERS.get(kind, kind)} run, found that of a "
                             f"{WRITERS.get(found, found)} run (kind {found!r}); is --run-dir the right one?")
    missing = sorted(KEYS[kind] - state.keys())
    if missing:
        raise StateFileError(f"{path}: expected a {kind} training state with the keys {sorted(KEYS[kind])}; "
                             f"it lacks {missing}")
    check_values(state, path, kind)
    return state


def _count(value):
    return type(value) is int and value >= 0  # not a bool, a float or a string


def _vectors(value):
    """{name: floating tensor} with finite values only (what an expert's p or a LoRA's factors are)."""
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(t, torch.Tensor) and t.is_floating_point()
                                           and bool(torch.isfinite(t).all()) for k, t in value.items())


def _adam(value):
    """An optimizer state_dict whose tensors are finite and whose second moments are not negative: a
    NaN there makes every later update NaN, and with it p, one step after the resume."""
    if not (isinstance(value, dict) and isinstance(value.get("state"), dict)
            and isinstance(value.get("param_groups"), list)):
        return False

    def sound(name, t):  # one entry of a parameter's state: exp_avg, exp_avg_sq, step
        if not isinstance(t, torch.Tensor):
            return True
        return bool(torch.isfinite(t).all()) and not (name == "exp_avg_sq" and bool((t < 0).any()))
    return all(isinstance(s, dict) and all(sound(k, t) for k, t in s.items()) for s in value["state"].values())


def check_values(state, path, kind):
    """StateFileError naming `path` for a value a resume would misuse: a step that is not a count (a
    negative one would rewrite the log from there), vectors that are not finite float tensors (NaN
    spreads to every logit), Adam moments that are not finite, a search distribution of mismatched or non-finite vectors."""
    def refuse(what, value, expected):
        raise StateFileError(f"{path}: its {what} is {str(value)[:200]}; expected {expected}")
    if kind == "reinforce":
        if not _count(state["step"]):
            refuse("step", repr(state["step"]), "a non-negative integer, the steps the run finished")
        if not _vectors(state["p"]):
            refuse("p", state["p"], "a dict of finite float tensors, the expert being trained")
        if not _adam(state["optimizer"]):
            refuse("optimizer", "an Adam state with non-finite or negative moments", "Adam's state_dict: finite "
                   "moments (exp_avg_sq not negative)")
        best = state["best"]
        if not (isinstance(best, dict) and {"accuracy", "step", "p"} <= best.keys() and type(best["step"]) is int
                and -1 <= best["step"] <= state["step"] and (best["p"] is None or _vectors(best["p"]))):
            refuse("best", best, f"a dict of the best step (-1 to {state['step']}), its accuracy and its p "
                                 f"(None or finite float tensors)")
        step0 = state.get("step0")
        if step0 is not None and not (isinstance(step0, dict) and _vectors(step0.get("p"))):
            refuse("step0", step0, "a dict whose p holds step 0's finite float tensors")
    else:
        if not _count(state["generation"]):
            refuse("generation", repr(state["generation"]), "a non-negative integer, the generations finished")
        vectors = [state[k] for k in ("mean", "std", "best")]
        if not all(isinstance(v, torch.Tensor) and v.is_floating_point() and v.dim() == 1
                   and v.shape == vectors[0].shape and bool(torch.isfinite(v).all()) for v in vectors):
            refuse("mean, std and best", [getattr(v, "shape", v) for v in vectors],
                   "three finite float vectors of one length, the number of coefficients searched")


def load_vectors(wrapper, state, path):
    """Loads a reinforce state's p into `wrapper` (svf.SVF or lora.LoRA), after checking that it, and
    the best and step-0 vectors a run loads later, fit the wrapper's matrices; StateFileError naming
    `path` and what differs otherwise (the wrapper's own error names no file)."""
    step0 = state.get("step0") or {}
    for what, p in (("best step's p", state["best"]["p"]), ("step 0's p", step0.get("p")), ("p", state["p"])):
        if p is not None:
            try:
                wrapper.load_state(p)
            except ValueError as e:  # svf.ExpertMismatch
                raise StateFileError(f"{path}: its {what} does not fit this run's expert: {e}") from None


def log_until(log_path, step, path):
    """The lines of a run's log.jsonl up to `step`, the step its state (`path`) finished: the rows of a
    step in progress when the run stopped are dropped. Refused (StateFileError): a state whose step
    is past the log's last row, since a run logs each step before it saves the state, so the two do
    not belong together; a log that is not JSON rows with a step. A run whose log is gone ([]) resumes."""
    if not os.path.exists(log_path):
        return []
    with open_regular(log_path, StateFileError, "log written by reinforce.py") as f:
        *lines, cut = f.read().decode("utf-8", errors="replace").split("\n")  # cut: "", or a row the kill cut off
    lines = [line + "\n" for line in lines]
    steps = []
    for i, line in enumerate(lines, 1):
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, TypeError, KeyError):
            steps.append(None)
        if type(steps[-1]) is not int:
            raise StateFileError(f"{log_path}, line {i}: {line.strip()[:200]!r}; expected a JSON row with an integer "
                                 f"step, as reinforce.py logs (restart without --resume, or with another --run-dir)")
    if step > max(steps, default=0):
        raise StateFileError(f"{path}: its step {step} is past the last step of {log_path}, {max(steps, default=0)}; "
                             f"a run logs each step before it saves its state, so the two are not of one run")
    return [line for line, s in zip(lines, steps) if s <= step]
