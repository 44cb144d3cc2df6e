"""The file readers refuse what they were not written to read (issue 29): a --resume state.pt is read
without unpickling code; a safetensors header that lies, an expert of the wrong dtype and a LoRA file
whose rank does not fit its factors are refused before anything is allocated or loaded, each with an
error that names the file."""

import dataclasses
import json
import os
import struct

import pytest
import torch

import cem
import lora
import reinforce
import run_state
import safetensors_io
import svf
from model import load_model
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


def test_resume_refuses_a_state_with_code_of_another_kind_or_truncated_naming_the_file(setup, tmp_path):
    train(setup, tmp_path)
    path, log = tmp_path / "run" / "state.pt", tmp_path / "run" / "log.jsonl"
    good, rows = path.read_bytes(), log.read_text()
    marker = tmp_path / "the payload ran"
    cases = {"code": (dict(torch.load(path, weights_only=False), extra=Payload(marker)), "unpickling them would run code"),
             "cem's": ({"generation": 1, "mean": torch.zeros(2), "std": torch.ones(2), "best": torch.zeros(2),
                        "fitness": [0.5, 0.0], "rng": torch.zeros(8, dtype=torch.uint8), "history": [], "config": {},
                        "experts": []}, "found that of a cem.py run"),
             "truncated": (None, "truncated or damaged")}
    for name, (state, message) in cases.items():
        if state is None:
            path.write_bytes(good[:len(good) // 2])
        else:
            torch.save(state, path)
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
    for rank, message in [("10000000", "do not fit rank 10000000"), ("0", "expected a positive integer"),
                          ("2.5", "expected a positive integer")]:
        safetensors_io.save(tmp_path / "big.safetensors", tensors, dict(meta, rank=rank))
        with pytest.raises(svf.ExpertMismatch, match=message) as refused:
            lora.load_adapter_for(model, path, str(tmp_path / "big.safetensors"))
        assert str(tmp_path / "big.safetensors") in str(refused.value) and made == []
