"""The file readers refuse what they were not written to read (issue 29): a --resume state.pt is read
without unpickling code; a safetensors header that lies, an expert of the wrong dtype and a LoRA file
whose rank does not fit its factors are refused before anything is allocated or loaded, each with an
error that names the file. Issue 39: NaN and infinities in experts, LoRA factors and mixes, paths that are
not regular files (a FIFO would hang open() forever: each loader must answer within a second), zero-size
tensors with dimensions no tensor can have, ranks in non-ASCII digits, and a state.pt's values (its step
a count within log.jsonl, its p the expert's shapes), each refused by name."""

import contextlib
import dataclasses
import json
import math
import os
import shutil
import struct
import threading

import pytest
import torch

import cem
import lora
import reinforce
import run_state
import safetensors_io
import svf
from data.evaluate import Result, compare_line
from svd_cache import checkpoint_identity
from tokenizer import Tokenizer, load_tiktoken_ranks
from model import load_model, load_state_dict
from test_reinforce import LowByteTask, byte_tokenizer, config


@pytest.fixture
def setup(tiny_checkpoint):
    path = tiny_checkpoint("llama", vocab_size=259)
    model, _ = load_model(path)
    return model, byte_tokenizer(), path


def train(setup, tmp_path, steps=2, resume=False):
    model, tok, path = setup
    return reinforce.train(config(steps=steps, eval_every=1), model, tok, path, LowByteTask(), str(tmp_path / "run"),
                           str(tmp_path / "run.safetensors"), resume=resume)


def same(a, b):
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    return a == b


def test_real_states_of_both_scripts_load_without_pickle_and_a_run_resumes(setup, tmp_path):
    """weights_only=True reads everything the two scripts save: Adam's state, the generator's, the config."""
    train(setup, tmp_path)
    path = tmp_path / "run" / "state.pt"
    assert same(run_state.load_state(path, "reinforce"), torch.load(path, weights_only=False))
    train(setup, tmp_path, steps=3, resume=True)
    assert run_state.load_state(path, "reinforce")["step"] == 3
    states = []
    cem.cem(lambda x: (float(-x.square().sum()), 0.0), 3, population=6, generations=2, log=lambda *a: None,
            on_generation=states.append)
    saved = dict(states[-1], config=dataclasses.asdict(cem.FewShotConfig()), experts=["0123456789abcdef"])
    torch.save(saved, tmp_path / "cem.pt")
    assert same(run_state.load_state(tmp_path / "cem.pt", "cem"), saved)


class Payload:
    """What a hostile state.pt carries: unpickling it runs os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def nan_moments(optimizer_state):
    """Adam's state_dict with its first moments NaN (what a NaN gradient saved would leave)."""
    state = {i: {k: torch.full_like(t, math.nan) if k == "exp_avg" else t for k, t in s.items()}
             for i, s in optimizer_state["state"].items()}
    assert state, "the run saved no Adam moments to damage"
    return dict(optimizer_state, state=state)


def test_resume_refuses_a_state_with_code_of_another_kind_or_truncated_naming_the_file(setup, tmp_path):
    train(setup, tmp_path)
    path, log = tmp_path / "run" / "state.pt", tmp_path / "run" / "log.jsonl"
    good, rows = path.read_bytes(), log.read_text()
    state = torch.load(path, weights_only=False)
    marker = tmp_path / "the payload ran"
    short = {name: p[:-1] for name, p in state["p"].items()}
    cases = {"code": (dict(state, extra=Payload(marker)), "unpickling them would run code"),
             "cem's": ({"generation": 1, "mean": torch.zeros(2), "std": torch.ones(2), "best": torch.zeros(2),
                        "fitness": [0.5, 0.0], "rng": torch.zeros(8, dtype=torch.uint8), "history": [], "config": {},
                        "experts": []}, "found that of a cem.py run"),
             "truncated": (None, "truncated or damaged"),
             # issue 39: values a resume relies on (a negative step rewrote the log from there, silently)
             "a negative step": (dict(state, step=-1), "its step is -1; expected a non-negative integer"),
             "a string step": (dict(state, step="2"), "its step is '2'; expected a non-negative integer"),
             "a bool step": (dict(state, step=True), "expected a non-negative integer"),
             "a step past the log": (dict(state, step=7), "its step 7 is past the last step of .*log.jsonl, 2"),
             "a p of another shape": (dict(state, p=short), "its p does not fit this run's expert"),
             "the best p of another shape": (dict(state, best=dict(state["best"], p=short)),
                                             "best step's p does not fit"),
             "a NaN in p": (dict(state, p={n: torch.full_like(p, math.nan) for n, p in state["p"].items()}),
                            "expected a dict of finite float tensors"),
             "a best step past the step": (dict(state, best=dict(state["best"], step=3)), "its best is"),
             "a NaN in Adam's moments": (dict(state, optimizer=nan_moments(state["optimizer"])), "its optimizer is"),
             "not an optimizer state": (dict(state, optimizer=[1, 2]), "its optimizer is")}
    for name, (saved, message) in cases.items():
        if saved is None:
            path.write_bytes(good[:len(good) // 2])
        else:
            torch.save(saved, path)
        with pytest.raises(run_state.StateFileError, match=message) as refused:
            train(setup, tmp_path, steps=3, resume=True)
        assert str(path) in str(refused.value), name
        assert not marker.exists() and log.read_text() == rows, name             # nothing ran, nothing written


def write_raw(path, header, data=b""):
    """A safetensors file with exactly this header (a str of JSON, or an object) and data section."""
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


F32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
LIES = {
    "duplicate tensor": ('{"a": %s, "a": %s}' % (json.dumps(F32), json.dumps(F32)), b"\0" * 8, "more than once"),
    "duplicate __metadata__": ('{"__metadata__": {"info": "{}"}, "__metadata__": {"info": "{\\"x\\": 1}"}, "a": %s}'
                               % json.dumps(F32), b"\0" * 8, "more than once"),
    "overlapping offsets": ({"a": F32, "b": F32}, b"\0" * 8, "without gaps or overlap"),
    "a gap": ({"a": dict(F32, data_offsets=[4, 12])}, b"\0" * 12, "without gaps or overlap"),
    "bytes left over": ({"a": F32}, b"\0" * 12, "expected them to fill it"),
    "negative shape": ({"a": dict(F32, shape=[-2], data_offsets=[0, 8])}, b"\0" * 8, "integers >= 0"),
    "overflowing shape": ({"a": dict(F32, shape=[2**62, 2**62])}, b"\0" * 8, "needs"),
    "string shape": ({"a": dict(F32, shape="2")}, b"\0" * 8, "expected a list of integers"),
    "float shape": ({"a": dict(F32, shape=[2.0])}, b"\0" * 8, "expected a list of integers"),
    "bool shape": ({"a": dict(F32, shape=[True, 2])}, b"\0" * 8, "expected a list of integers"),
    "string offsets": ({"a": dict(F32, data_offsets=["0", "8"])}, b"\0" * 8, "two integers >= 0"),
    "float offsets": ({"a": dict(F32, data_offsets=[0.0, 8.0])}, b"\0" * 8, "two integers >= 0"),
    "list as dtype": ({"a": dict(F32, dtype=["F32"])}, b"\0" * 8, "expected one of"),
    "string as __metadata__": ({"__metadata__": "info", "a": F32}, b"\0" * 8, "must map strings to strings"),
    "a number in __metadata__": ({"__metadata__": {"info": 1}, "a": F32}, b"\0" * 8, "must map strings to strings"),
    "NaN": ('{"a": {"dtype": "F32", "shape": [NaN], "data_offsets": [0, 8]}}', b"\0" * 8, "does not allow"),
    "an extra key": ({"a": dict(F32, note="x")}, b"\0" * 8, "exactly the keys"),
    "a list as entry": ({"a": [1]}, b"\0" * 8, "malformed entry"),
}


def test_every_malformed_safetensors_header_is_refused_by_name(tmp_path):
    for name, (header, data, message) in LIES.items():
        path = write_raw(tmp_path / f"{name}.safetensors", header, data)
        with pytest.raises(safetensors_io.SafetensorsError, match=message) as refused:
            safetensors_io.load(path)
        assert str(path) in str(refused.value), name


def test_an_expert_of_another_dtype_is_refused_before_it_is_loaded(setup, tmp_path):
    model, _, path = setup
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", use_cache=False, log=lambda *a: None)
    wrapper.save_expert(tmp_path / "expert.safetensors")
    tensors, meta = safetensors_io.load(tmp_path / "expert.safetensors")
    safetensors_io.save(tmp_path / "int.safetensors", {k: t.to(torch.int32) for k, t in tensors.items()}, meta)
    with pytest.raises(safetensors_io.SafetensorsError, match="expected every tensor in F32, found .*I32") as refused:
        wrapper.load_expert(tmp_path / "int.safetensors")
    assert str(tmp_path / "int.safetensors") in str(refused.value)
    with pytest.raises(svf.ExpertMismatch, match="lacks \\['checkpoint'\\]"):
        safetensors_io.save(tmp_path / "bare.safetensors", tensors, {k: v for k, v in meta.items() if k != "checkpoint"})
        svf.load_expert_for(model, path, tmp_path / "bare.safetensors", use_cache=False, log=lambda *a: None)


def test_a_lora_rank_that_does_not_fit_its_factors_is_refused_before_any_allocation(setup, tmp_path, monkeypatch):
    model, _, path = setup
    adapter = lora.LoRA(model, svf.checkpoint_identity(path), "qv", rank=2)
    adapter.save_expert(tmp_path / "lora.safetensors")
    tensors, meta = safetensors_io.load(tmp_path / "lora.safetensors")
    made = []
    monkeypatch.setattr(lora.LoRA, "__init__", lambda *a, **k: made.append(a) or pytest.fail("a LoRA was allocated"))
    # "٢" (Arabic-Indic 2) and "¹" pass str.isdigit(); int() reads the first as 2 and refuses the second, and
    # refuses a string of thousands of digits: each is refused by name, as an ASCII rank of 0 or 2.5 is
    for rank, message in [("10000000", "do not fit rank 10000000"), ("0", "expected a positive integer"),
                          ("2.5", "expected a positive integer"), ("\u0662", "ASCII digits"),
                          ("\u00b9", "ASCII digits"),
                          ("9" * 5000, "ASCII digits")]:
        safetensors_io.save(tmp_path / "big.safetensors", tensors, dict(meta, rank=rank))
        with pytest.raises(svf.ExpertMismatch, match=message) as refused:
            lora.load_adapter_for(model, path, str(tmp_path / "big.safetensors"))
        assert str(tmp_path / "big.safetensors") in str(refused.value) and made == []



# ----------------------------------------------------------------------------- issue 39: third round

def quiet(*_):
    pass


def experts_of(setup, tmp_path, n=2):
    """(SVF wrapper, paths of n expert files of the tiny model with targets "mlp", each another p)."""
    model, _, path = setup
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", use_cache=False, log=quiet)
    paths = []
    for k in range(n):
        paths.append(str(tmp_path / f"expert{k}.safetensors"))
        wrapper.save_expert(paths[-1], {name: p + 0.5 * k for name, p in wrapper.state().items()}, task=f"t{k}")
    return wrapper, paths


def rewrite(path, out=None, change=None, meta=None):
    """Saves the file at `path` again (to `out`, default itself) with change(tensors) applied, or other metadata;
    returns the name of the tensor change() returns."""
    tensors, old = safetensors_io.load(path)
    tensors = {k: t.clone() for k, t in tensors.items()}
    name = change(tensors) if change else None
    safetensors_io.save(out or path, tensors, dict(old, **(meta or {})))
    return name


def put(value, index=0):
    """A change for rewrite(): `value` into entry `index` of the first tensor by name."""
    def change(tensors):
        name = sorted(tensors)[0]
        tensors[name].view(-1)[index] = value
        return name
    return change


def test_non_finite_experts_and_lora_factors_are_refused_by_file_and_tensor(setup, tmp_path, monkeypatch):
    """NaN or an infinity in an expert's p or a LoRA factor would make every logit NaN: refused, naming the
    file and the tensor, by every loader (cem.py's mixing too) and before an SVD or a W' is made."""
    model, _, path = setup
    wrapper, (a, b) = experts_of(setup, tmp_path)
    monkeypatch.setattr(svf.SVF, "weights", lambda *_: pytest.fail("a W' was recomposed"))
    for value in (math.nan, math.inf, -math.inf):
        bad = str(tmp_path / f"bad-{value}.safetensors")
        name = rewrite(a, bad, put(value, index=3))
        with pytest.raises(safetensors_io.SafetensorsError, match="non-finite"):
            wrapper.load_expert(bad)
        with monkeypatch.context() as m:  # the loaders that make a wrapper refuse before its SVD
            m.setattr(svf.SVF, "__init__", lambda *_, **__: pytest.fail("an SVF wrapper was made"))
            for load in (lambda: svf.load_expert_for(model, path, bad, use_cache=False, log=quiet),
                         lambda: lora.load_adapter_for(model, path, bad, use_cache=False, log=quiet),
                         lambda: cem.load_experts(model, path, [b, bad], use_cache=False, log=quiet)):
                with pytest.raises(safetensors_io.SafetensorsError, match="non-finite") as refused:
                    load()
                assert bad in str(refused.value) and repr(name) in str(refused.value), value
    # finite, but sigmoid(p) underflows to 0 for a whole matrix: its W' would be 0 / 0
    rewrite(a, change=lambda t: t[sorted(t)[0]].fill_(-200.0))
    with pytest.raises(svf.ExpertMismatch, match="scales every singular value by 0") as refused:
        wrapper.load_expert(a)
    assert a in str(refused.value)

    adapter = lora.LoRA(model, svf.checkpoint_identity(path), "qv", rank=2)
    lora_path = str(tmp_path / "lora.safetensors")
    adapter.save_expert(lora_path)
    for value, message in ((math.inf, "non-finite"), (math.nan, "non-finite"), (-math.inf, "non-finite")):
        name = rewrite(lora_path, str(tmp_path / "bad-lora.safetensors"), put(value))
        with pytest.raises(safetensors_io.SafetensorsError, match=message) as refused:
            lora.load_adapter_for(model, path, str(tmp_path / "bad-lora.safetensors"))
        assert str(tmp_path / "bad-lora.safetensors") in str(refused.value) and repr(name) in str(refused.value)
    # finite factors whose product overflows float32: 1e30 x 1e30
    adapter.save_expert(lora_path, {k: torch.full_like(t, 1e30) for k, t in adapter.state().items()})
    with pytest.raises(svf.ExpertMismatch, match="may overflow") as refused:
        lora.load_adapter_for(model, path, lora_path)
    assert lora_path in str(refused.value)


def test_a_mix_with_non_finite_or_overflowing_alpha_is_refused_by_name(setup, tmp_path):
    """A mix's alpha lives in its JSON info, and Python's json reads NaN and Infinity."""
    wrapper, paths = experts_of(setup, tmp_path)
    mix = str(tmp_path / "mix.safetensors")
    cem.save_mix(wrapper, mix, [wrapper.load_expert(p) for p in paths], torch.tensor([0.5, 0.5]), task="t")
    info = svf.file_info(mix)
    cases = {"NaN": ([math.nan, 0.5], "finite numbers"), "inf": ([0.5, math.inf], "finite numbers"),
             "a string": (["0.5", 0.5], "finite numbers"), "one of two": ([0.5], "expected 2 finite numbers"),
             "overflowing float32": ([1e308, 0.5], "not all finite"),
             "all zero": ([0.0, 0.0], "not all finite and > 0"),
             "components not a list": ("x", "expected a list of")}
    for name, (value, message) in cases.items():
        key = "experts" if name.startswith("components") else "alpha"
        rewrite(mix, meta={"info": json.dumps(dict(info, **{key: value}))})
        with pytest.raises(ValueError, match=message) as refused:
            cem.mix_from_file(wrapper, mix)
        assert mix in str(refused.value), name
    rewrite(mix, meta={"info": json.dumps(info)})
    z, _ = cem.mix_from_file(wrapper, mix)                                   # the mix as written still loads
    assert all(bool(torch.isfinite(v).all()) for v in z.values())


def finishes_within(seconds, load, fifo=None):
    """The exception load() raises, which it must do within `seconds`; a load still waiting then (a FIFO's
    open() waits for a writer forever) fails the test instead of hanging the suite, and is set free."""
    outcome = []

    def target():
        try:
            load()
            outcome.append(None)
        except BaseException as e:  # SystemExit too: the scripts' refusals
            outcome.append(e)
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo:  # a writer that opens and closes: the waiting open() returns, and the read sees the end
            with contextlib.suppress(OSError):  # ENXIO: nothing waits on the FIFO after all
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"still loading after {seconds} s (waiting on {fifo}?)")
    return outcome[0]


def test_every_loader_refuses_a_fifo_a_device_or_a_folder_by_name_within_a_second(setup, tmp_path):
    """A FIFO (named pipe) given as an expert, a LoRA, a mix's component, state.pt or log.jsonl: open() for
    reading would wait for a writer forever. Each is refused before it is opened, naming the path."""
    model, tok, path = setup
    wrapper, (a, b) = experts_of(setup, tmp_path)
    fifo = str(tmp_path / "fifo.safetensors")
    os.mkfifo(fifo)
    loaders = {"safetensors_io.load": lambda p: safetensors_io.load(p),
               "safetensors_io.read_header": lambda p: safetensors_io.read_header(p),
               "svf.file_info": lambda p: svf.file_info(p),
               "SVF.load_expert": lambda p: wrapper.load_expert(p),
               "svf.load_expert_for": lambda p: svf.load_expert_for(model, path, p, use_cache=False, log=quiet),
               "lora.load_adapter_for": lambda p: lora.load_adapter_for(model, path, p, use_cache=False, log=quiet),
               "cem.load_experts": lambda p: cem.load_experts(model, path, [a, p], use_cache=False, log=quiet),
               "run_state.load_state": lambda p: run_state.load_state(p, "reinforce"),
               "run_state.log_until": lambda p: run_state.log_until(p, 0, "state.pt")}
    kinds = ((fifo, "a FIFO (named pipe)"), ("/dev/null", "a character device"), (str(tmp_path), "a folder"))
    for target, kind in kinds:
        for name, load in loaders.items():
            error = finishes_within(1.0, lambda: load(target), fifo)
            assert isinstance(error, ValueError) and f"{target} is {kind}, not a regular file" in str(error), \
                (name, target, error)

    # a mix whose component has become a FIFO
    mix = str(tmp_path / "mix.safetensors")
    cem.save_mix(wrapper, mix, [wrapper.load_expert(p) for p in (a, b)], torch.tensor([0.5, 0.5]), task="t")
    os.unlink(b)
    os.mkfifo(b)
    error = finishes_within(1.0, lambda: cem.mix_from_file(wrapper, mix), b)
    assert isinstance(error, safetensors_io.SafetensorsError) and f"{b} is a FIFO" in str(error), error

    # reinforce.py --resume with state.pt, then log.jsonl, a FIFO: refused by name
    train(setup, tmp_path)
    for name in ("state.pt", "log.jsonl"):
        fifo, kept = tmp_path / "run" / name, (tmp_path / "run" / name).read_bytes()
        os.unlink(fifo)
        os.mkfifo(fifo)
        # a looser deadline: train() sets up its task, wrapper and optimiser before it reads the state
        error = finishes_within(30.0, lambda: train(setup, tmp_path, steps=3, resume=True), str(fifo))
        assert isinstance(error, run_state.StateFileError) and f"{fifo} is a FIFO" in str(error), error
        os.unlink(fifo)
        fifo.write_bytes(kept)



def test_a_checkpoints_config_tokenizer_files_and_result_files_that_are_fifos_are_refused_by_name(tiny_checkpoint,
                                                                                                 tmp_path):
    """The rest of what a path can name: a checkpoint's config.json (read by load_model and by the SVD
    cache's digest) and shard index, tokenizer.json and Meta's tokenizer.model, and an evaluation's
    result file (--compare): a FIFO there is refused by name too, within a second, never waited on."""
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(tiny_checkpoint("llama", vocab_size=259), checkpoint)

    def as_fifo(path):
        path.unlink(missing_ok=True)
        os.mkfifo(path)
        return str(path)
    config = as_fifo(checkpoint / "config.json")
    for name, load in {"load_model": lambda: load_model(str(checkpoint)),
                       "checkpoint_identity": lambda: checkpoint_identity(str(checkpoint))}.items():
        error = finishes_within(1.0, load, config)
        assert isinstance(error, ValueError) and f"{config} is a FIFO" in str(error), (name, error)
    (tmp_path / "sharded").mkdir()
    index = as_fifo(tmp_path / "sharded" / "model.safetensors.index.json")
    error = finishes_within(1.0, lambda: load_state_dict(str(tmp_path / "sharded")), index)
    assert isinstance(error, ValueError) and f"{index} is a FIFO" in str(error), error
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    for fifo, load in ((as_fifo(tok_dir / "tokenizer.json"), lambda: Tokenizer.from_dir(str(tok_dir))),
                       (as_fifo(tmp_path / "tokenizer.model"), lambda: load_tiktoken_ranks(str(tmp_path / "tokenizer.model"))),
                       (as_fifo(tmp_path / "result.json"), lambda: Result.load(str(tmp_path / "result.json"))),
                       (str(tmp_path / "result.json"), lambda: compare_line(str(tmp_path / "result.json"), None))):
        error = finishes_within(1.0, load, fifo)
        assert isinstance(error, ValueError) and fifo in str(error) and "regular file" in str(error), (fifo, error)


LIES.update({  # issue 39: zero-size tensors whose other dimensions do not fit a tensor, too many dimensions
    "zero-size, a dimension past int64": ({"a": dict(F32, shape=[0, 2**64], data_offsets=[0, 0])}, b"",
                                          "nonzero product is below 2\\*\\*63"),
    "zero-size, strides past int64": ({"a": dict(F32, shape=[0, 2**62, 4], data_offsets=[0, 0])}, b"",
                                      "nonzero product is below 2\\*\\*63"),
    "65 dimensions": ({"a": dict(F32, shape=[1] * 65, data_offsets=[0, 4])}, b"\0" * 4, "at most 64 dimensions"),
})


def test_a_cem_state_and_a_log_are_checked_before_they_are_resumed(tmp_path):
    states = []
    cem.cem(lambda x: (float(-x.square().sum()), 0.0), 3, population=6, generations=1, log=quiet,
            on_generation=states.append)
    good = dict(states[-1], config={}, experts=[])
    for change, message in (({"generation": -1}, "its generation is -1"),
                            ({"generation": 1.0}, "its generation is 1.0"),
                            ({"mean": torch.tensor([0.0, math.nan, 0.0])}, "three finite float vectors"),
                            ({"std": torch.ones(4)}, "three finite float vectors of one length")):
        torch.save(dict(good, **change), tmp_path / "state.pt")
        with pytest.raises(run_state.StateFileError, match=message) as refused:
            run_state.load_state(tmp_path / "state.pt", "cem")
        assert str(tmp_path / "state.pt") in str(refused.value)
    log = tmp_path / "log.jsonl"
    log.write_text('{"kind": "eval", "step": 0}\n{"kind": "step", "step": 1}\n{"kind": "step", "st')  # a row cut off
    assert run_state.log_until(log, 1, "state.pt") == ['{"kind": "eval", "step": 0}\n', '{"kind": "step", "step": 1}\n']
    assert run_state.log_until(log, 0, "state.pt") == ['{"kind": "eval", "step": 0}\n']   # a step in progress: dropped
    with pytest.raises(run_state.StateFileError, match="its step 2 is past the last step"):
        run_state.log_until(log, 2, "state.pt")
    log.write_text('{"kind": "eval", "step": 0}\n{"kind": "step", "step": "1"}\n')
    with pytest.raises(run_state.StateFileError, match="line 2: .*expected a JSON row with an integer step") as refused:
        run_state.log_until(log, 0, "state.pt")
    assert str(log) in str(refused.value)
