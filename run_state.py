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
"""

import os
import pickle
import zipfile

import torch

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
        state = torch.load(path, weights_only=True, map_location="cpu")
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
    return state
