"""Several processes with torch.distributed (distributed.py), on the CPU: gloo, 2 ranks, tiny random models.

The script-level tests launch this file under torchrun, as a user launches a script:
`python -m torch.distributed.run --nproc_per_node 2 tests/test_distributed.py SCENARIO DIR`, and
compare with the same scenario run in the test's own process (one process, no process group). The
helper-level tests spawn two ranks with torch.multiprocessing. Each test takes seconds; torch's
import in three processes is most of it.
"""

import builtins
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path[:0] = [p for p in (ROOT, HERE) if p not in sys.path]

import distributed  # noqa: E402

quiet = lambda *a, **k: None  # noqa: E731
LAUNCH = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK",
          "ROLE_RANK", "ROLE_WORLD_SIZE", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_ERROR_FILE")


def free_port():
    """A TCP port nobody listens on now (the OS picks it), so that tests running together never share one."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH}
    return dict(env, OMP_NUM_THREADS="1", T2_CACHE_DIR=str(tmp_path / "cache"), PYTHONUNBUFFERED="1")


def launch(tmp_path, scenario, directory, ranks=2, timeout=120):
    """Runs a scenario of this file under torchrun. Returns (CompletedProcess, seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "--tee", "3"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + [os.path.abspath(__file__), scenario, str(directory)], capture_output=True,
                          text=True, timeout=timeout, env=child_env(tmp_path), cwd=ROOT)
    return proc, time.perf_counter() - t0


@pytest.fixture
def in_one_process(tmp_path, monkeypatch):
    """in_one_process(scenario, directory): the scenario here, in this process, with one thread
    as the ranks have (so that the floats are comparable bit for bit)."""
    monkeypatch.setenv("T2_CACHE_DIR", str(tmp_path / "cache"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda scenario, directory: _scenario(scenario, directory, monkeypatch.setattr)
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- one process: nothing changes

def test_without_torchrun_there_is_no_process_group(monkeypatch):
    for v in LAUNCH:
        monkeypatch.delenv(v, raising=False)
    distributed.setup()
    assert not torch.distributed.is_initialized()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert list(distributed.shard(5)) == [0, 1, 2, 3, 4]
    assert distributed.gather_objects(iter("abc")) == ["a", "b", "c"]
    grads = [torch.full((3,), 4.0), torch.zeros(2)]
    assert distributed.sum_over_ranks(grads) is grads and torch.equal(grads[0], torch.full((3,), 4.0))
    distributed.check_same("anything", "p")  # nothing to compare with
    assert distributed.run(lambda x: x + 1, 1) == 2


def test_digest_sees_every_bit():
    a = {"x": torch.tensor([1.0, 2.0]), "y": torch.zeros(2, 2, dtype=torch.bfloat16)}
    b = {"y": a["y"].clone(), "x": a["x"].clone()}
    assert distributed.digest(a) == distributed.digest(b) and len(distributed.digest(a)) == 16
    b["x"][1] = torch.nextafter(torch.tensor(2.0), torch.tensor(3.0))  # one ulp
    assert distributed.digest(a) != distributed.digest(b)
    assert distributed.digest([torch.zeros(2)]) != distributed.digest([torch.zeros(2, dtype=torch.float64)])


# ----------------------------------------------------------------------------- two ranks, spawned

def _helpers(rank, world, port, checkpoint):
    """One rank of test_helpers_on_two_ranks (runs in a spawned process). It ends as a script's rank
    does, through distributed.run: a rank that returned to the interpreter's exit aborted now and
    then (SIGABRT, see the end of distributed.run)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    distributed.run(_helper_checks, rank, world, checkpoint)


def _helper_checks(rank, world, checkpoint):
    assert torch.distributed.get_backend() == "gloo" and distributed.world_size() == world
    # shard and gather: strided shares, back in item order, also when a rank has none
    for n in (0, 1, 5, 6):
        mine = list(distributed.shard(n))
        assert mine == list(range(rank, n, world))
        assert distributed.gather_objects([f"item {i}" for i in mine]) == [f"item {i}" for i in range(n)]
    assert distributed.map_items(lambda xs: [x * 10 for x in xs], range(7)) == [x * 10 for x in range(7)]

    # sum_over_ranks: the gradient of one process's mean over a batch of 5, from shares of 3 and 2
    from model import load_model
    model, _ = load_model(checkpoint)
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(0, 97, (5, 9), generator=torch.Generator().manual_seed(0))

    def losses(rows):  # next-token cross-entropy of each sequence
        logits = model(ids[rows, :-1])  # (b, T-1, vocab)
        return torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[rows, 1:], reduction="none").sum(1)

    model.zero_grad()
    losses(list(range(5))).mean().backward()
    want = [p.grad.clone() for p in params]
    model.zero_grad()
    losses(list(distributed.shard(5))).sum().backward()  # this rank's rows, summed
    local = [p.grad.clone() for p in params]
    distributed.sum_over_ranks([p.grad for p in params])  # in place, one flat all_reduce
    for p in params:
        p.grad /= 5
    assert not all(torch.allclose(a, b) for a, b in zip(local, want))  # a share alone is not the gradient
    for p, w in zip(params, want):  # equal up to float32 summation order (a wrong scale is off by ~|w|)
        assert (p.grad - w).norm() <= 1e-5 * w.norm(), ((p.grad - w).norm(), w.norm())
    distributed.check_same(distributed.digest([p.grad for p in params]), "the reduced gradient")

    # check_same names the rank that disagrees, on every rank
    distributed.check_same(distributed.digest([torch.ones(3)]), "p")
    with pytest.raises(RuntimeError, match=r"p after step 3 differs across ranks: rank 0 has \w+, rank\(s\) \[1\]"):
        distributed.check_same(distributed.digest([torch.ones(3) * (1 + rank)]), "p after step 3")


def test_helpers_on_two_ranks(tiny_checkpoint):
    torch.multiprocessing.spawn(_helpers, args=(2, free_port(), tiny_checkpoint("llama")), nprocs=2)


# ----------------------------------------------------------------------------- scripts under torchrun

def setup_dir(tmp_path, tiny_checkpoint):
    """A directory with a tiny checkpoint (byte vocabulary) and two random SVF experts on its MLP."""
    import svf
    from model import load_model
    d = tmp_path / "run"
    d.mkdir()
    path = tiny_checkpoint("llama", vocab_size=259)
    os.symlink(path, d / "model")
    model, _ = load_model(path)
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "mlp", use_cache=False, log=quiet)
    for k in range(2):
        g = torch.Generator().manual_seed(k)
        p = {n: 2 * torch.randn(len(f.sigma), generator=g) for n, f in zip(wrapper.names, wrapper.factors)}
        wrapper.save_expert(str(d / f"expert{k}.safetensors"), p, task=f"task{k}")
    return d


def writes(d, rank):
    """The files rank `rank` wrote (os.replace targets and files opened to write), cache excluded."""
    path = d / f"writes-rank{rank}.txt"
    return path.read_text().split() if path.exists() else []


def test_a_sharded_evaluation_gives_one_process_results(tmp_path, tiny_checkpoint, in_one_process):
    """evaluate_model.py and adapt.py --task under torchrun, 2 ranks: the same records (outputs,
    verdicts, choices) as one process; rank 0 alone prints and writes; the files record world_size."""
    one = setup_dir(tmp_path, tiny_checkpoint)  # outputs are named by the world size
    in_one_process("evaluate", one)
    proc2, _ = launch(tmp_path, "evaluate", one, ranks=2)
    assert proc2.returncode == 0, proc2.stdout + proc2.stderr
    for name, other in (("evaluate", "evaluate-world2"), ("evaluate", "evaluate-resumed"), ("adapt", "adapt-world2")):
        a, b = json.load(open(one / f"{name}-world1.json")), json.load(open(one / f"{other}.json"))
        assert len(a["records"]) == 12 and a["records"] == b["records"]  # ids, outputs, answers, verdicts, choices
        assert a["settings"]["world_size"] == 1 and b["settings"]["world_size"] == 2
    confusion = [json.load(open(one / f"adapt-world{w}.json"))["confusion"] for w in (1, 2)]
    assert confusion[0] == confusion[1]
    assert writes(one, 1) == []
    assert sorted(set(writes(one, 0))) == sorted(str(one / f"{n}.json") for n in ("adapt-world2", "evaluate-resumed",
                                                                                "evaluate-world2"))
    # 12 items in evaluation batches of 8 (2 ranks x 2 generation batches of 2): 4 + 2 each; resumed: 4 + 3 of 7
    assert "[default0]:rank 0 did 10 items" in proc2.stderr and "[default1]:rank 1 did 9 items" in proc2.stderr
    assert "[default0]:resuming: 5 items already done, 7 to go" in proc2.stdout
    lines = proc2.stdout.splitlines()  # torchrun --tee prefixes each rank's lines with [default<rank>]
    assert any("accuracy" in line for line in lines if line.startswith("[default0]"))
    assert not any(line.startswith("[default1]") for line in lines)


def test_a_sharded_cem_generation_gives_one_process_fitnesses(tmp_path, tiny_checkpoint, in_one_process):
    """cem.py's search under torchrun: each member is scored by one rank, with the fitness one
    process gives it, and the search (members, alpha, mix) is the one process's."""
    one = setup_dir(tmp_path, tiny_checkpoint)
    in_one_process("cem", one)
    proc, _ = launch(tmp_path, "cem", one, ranks=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [[json.loads(line) for line in open(one / f"cem-world{w}" / "members.jsonl")] for w in (1, 2)]
    assert [(r["generation"], r["member"]) for r in rows[0]] == [(g, m) for g in (1, 2) for m in range(5)]
    assert rows[0] == rows[1]  # alpha, fitness (accuracy, log-likelihood) and outputs of every member
    assert "[default0]:rank 0 did 0 items and 6 members" in proc.stderr  # members 0, 2, 4 of each generation
    assert "[default1]:rank 1 did 0 items and 4 members" in proc.stderr
    import svf
    a, b = (svf.file_info(str(one / f"mix-world{w}.safetensors")) for w in (1, 2))
    assert a["alpha"] == b["alpha"] and a["fitness"] == b["fitness"] and (a["world_size"], b["world_size"]) == (1, 2)
    assert writes(one, 1) == []
    assert str(one / "mix-world2.safetensors") in writes(one, 0)


@pytest.mark.parametrize("how", ["raise", "kill"])
def test_a_failing_rank_stops_the_run_and_leaves_the_last_state(tmp_path, tiny_checkpoint, in_one_process, capsys, how):
    """Rank 1 raises (or is killed) in CEM generation 2: torchrun ends the run, non-zero, naming
    rank 1 and the error, within seconds; generation 1's state, written by rank 0, resumes in one process."""
    d = setup_dir(tmp_path, tiny_checkpoint)
    (d / "fail").write_text(how)
    proc, seconds = launch(tmp_path, "cem", d, ranks=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and seconds < 60, out
    root_cause = out.split("Root Cause (first observed failure)")[-1]  # torchrun's report of the failed worker
    if how == "raise":
        assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause), out
        assert "rank 1 failed: RuntimeError: injected failure in generation 2" in out
        assert "RuntimeError: injected failure in generation 2" in root_cause  # recorded, with its traceback
    else:
        # A killed rank leaves no error file, so torchrun dates its failure when it notices it; rank 0,
        # whose next collective fails at once ("Connection closed by peer"), can record its error first
        # on a loaded machine and be named the root cause. Either way the report names rank 1's SIGKILL.
        report = out.split("ChildFailedError")[-1]
        assert re.search(r"rank\s*: 1 \(local_rank: 1\)\s*exitcode\s*: -9 .*\(SIGKILL\)", report), out
        assert re.search(r"rank\s*: 1 \(local_rank: 1\)", root_cause) or "Connection closed by peer" in root_cause, out
    run_dir = d / "cem-world2"
    state = torch.load(run_dir / "state.pt", weights_only=False)
    assert state["generation"] == 1 and not os.path.exists(d / "mix-world2.safetensors")
    assert [json.loads(line)["generation"] for line in open(run_dir / "members.jsonl")] == [1] * 5
    (d / "fail").unlink()
    (d / "resume").write_text("2")  # the world size whose run to continue
    in_one_process("cem", d)  # --resume in one process
    assert "resuming the search in" in capsys.readouterr().out
    assert [json.loads(line)["generation"] for line in open(run_dir / "members.jsonl")] == [1] * 5 + [2] * 5


def _reinforce_state(d, name):
    return torch.load(d / name / "state.pt", weights_only=False)


def _log(d, name, kind):
    return [r for r in map(json.loads, open(d / name / "log.jsonl")) if r["kind"] == kind]


def test_two_reinforce_steps_under_two_ranks_give_one_process_p(tmp_path, tiny_checkpoint, in_one_process):
    """reinforce.py under torchrun (greedy rollouts, the half-batch baseline, a held-out slice):
    each rank rolls out half the questions, the gradient is summed over the ranks, and p after two
    steps is one process's to float tolerance; the log, the held-out read and the expert are the
    same; rank 0 alone writes. Then a one-process run resumed under two ranks ends where one
    process ends (the batches are a pure function of the step)."""
    one = setup_dir(tmp_path, tiny_checkpoint)
    in_one_process("reinforce", one)
    proc, _ = launch(tmp_path, "reinforce", one, ranks=2)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = _reinforce_state(one, "rl-world1"), _reinforce_state(one, "rl-world2")
    assert a["step"] == b["step"] == 2
    # Float tolerance: the ranks sum the gradient in another order, and Adam divides each element by
    # its own magnitude, so an element whose gradient is near 0 moves by up to ~1e-5 differently (lr 0.05)
    for name in a["p"]:
        torch.testing.assert_close(a["p"][name], b["p"][name], rtol=0, atol=5e-5)
    assert not all(torch.equal(a["p"][n], a["step0"]["p"][n]) for n in a["p"])  # p moved
    for kind in ("step", "eval", "heldout"):
        rows = [_log(one, f"rl-world{w}", kind) for w in (1, 2)]
        keys = ("reward", "accuracy", "answered") if kind == "step" else ("accuracy", "step")
        assert rows[0] and [[r[k] for k in keys] for r in rows[0]] == [[r[k] for k in keys] for r in rows[1]], kind
        if kind == "step":
            for r0, r1 in zip(*rows):
                assert r1["loss"] == pytest.approx(r0["loss"], rel=1e-4)
                assert r1["grad_cos"] == pytest.approx(r0["grad_cos"], abs=1e-4)
    assert writes(one, 1) == []
    assert str(one / "rl-world2" / "state.pt") in writes(one, 0) and str(one / "rl-world2.safetensors") in writes(one, 0)
    resumed = _reinforce_state(one, "rl-resumed")
    for name in a["p"]:
        torch.testing.assert_close(a["p"][name], resumed["p"][name], rtol=0, atol=5e-5)
    assert [r["step"] for r in _log(one, "rl-resumed", "step")] == [1, 2]
    groups = _log(one, "rl-groups", "step")  # sampled groups: the ranks' p agree (checked at each validation)
    assert len(groups) == 2 and all(0 <= r["mixed"] <= 4 for r in groups)


# ----------------------------------------------------------------------------- the scenarios (run as a script)

def _spy_writes(d):
    """Records every file this rank writes (os.replace targets, open for writing) in writes-rank<R>.txt."""
    log, real_open, real_replace = str(d / f"writes-rank{distributed.rank()}.txt"), builtins.open, os.replace
    cache = os.environ["T2_CACHE_DIR"]

    def note(path):
        path = os.path.abspath(os.fspath(path))
        # /proc/self: the kernel's interface (chat.reset_peak_rss), each rank its own process, no file
        if path != os.devnull and not path.startswith((cache, "/proc/self/")) and not path.endswith(".tmp"):
            with real_open(log, "a") as f:
                f.write(path + "\n")

    def spy_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax"):
            note(file)
        return real_open(file, mode, *args, **kwargs)

    def spy_replace(src, dst, *args, **kwargs):
        note(dst)
        return real_replace(src, dst, *args, **kwargs)

    builtins.open, os.replace = spy_open, spy_replace


def _count_work(setattr):
    """At exit, this rank says on stderr how many items evaluate_model.py completed and how many
    CEM members it scored: its share, not everything."""
    import atexit
    import chat
    import cem
    done = dict(items=0, members=0)
    complete, score = chat.Completer.__call__, cem.ShotFitness.__call__

    def counting_complete(self, message_lists):
        done["items"] += len(message_lists)
        return complete(self, message_lists)

    def counting_score(self, x):
        done["members"] += 1
        return score(self, x)
    setattr(chat.Completer, "__call__", counting_complete)
    setattr(cem.ShotFitness, "__call__", counting_score)
    rank = distributed.rank()  # at exit the process group is gone
    atexit.register(lambda: print(f"rank {rank} did {done['items']} items and {done['members']} members",
                                  file=sys.stderr, flush=True))


def _scenario(name, d, setattr=setattr):
    """Runs evaluate_model.py and adapt.py --task ("evaluate") or cem.py ("cem") on the tiny
    checkpoint and experts in d, the task stubbed (test_cem.LowByteTask); outputs named by the world
    size. Under torchrun, every file a rank writes is listed in d/writes-rank<R>.txt."""
    import adapt
    import cem
    import chat
    import evaluate_model
    from model import load_model
    from test_cem import LowByteTask, byte_tokenizer
    d = __import__("pathlib").Path(d).resolve()
    W = distributed.world_size()
    model_dir = str(d / "model")
    model, _ = load_model(model_dir)
    tok = byte_tokenizer()
    for module in (evaluate_model, adapt, cem, chat):
        setattr(module, "load", lambda args: (model, tok, model_dir))
        setattr(module, "get_task", lambda name, prompt=None, data_dir=None: LowByteTask(prompt=prompt))
    if W > 1:
        _spy_writes(d)
        _count_work(setattr)
    common = ["--model", model_dir, "--max-new-tokens", "3", "--batch-size", "2"]
    experts = [str(d / f"expert{k}.safetensors") for k in range(2)]
    if name == "evaluate":
        def run(*flags):
            evaluate_model.main(["--task", "lowbyte", "--split", "test", *common, *flags])
        run("--out", str(d / f"evaluate-world{W}.json"))
        # one process evaluates 5 items, and torchrun's ranks --resume it to all 12
        run("--out", str(d / "evaluate-resumed.json"), *(["--resume"] if W > 1 else ["--limit", "5"]))
        adapt.main(["--strategy", "prompt", "--task", "lowbyte", *common, "--code-expert", "base",
                    "--math-expert", experts[0], "--reasoning-expert", experts[1],
                    "--out", str(d / f"adapt-world{W}.json")])
    elif name == "cem":
        fail = (d / "fail").read_text() if (d / "fail").exists() else None
        resume = (d / "resume").read_text() if (d / "resume").exists() else None
        if fail and distributed.rank() == 1:
            calls, call = [0], cem.ShotFitness.__call__

            def failing(self, x):  # rank 1 scores members 1 and 3 of each generation of 5
                calls[0] += 1
                if calls[0] == 3:
                    if fail == "kill":
                        os.kill(os.getpid(), signal.SIGKILL)
                    raise RuntimeError("injected failure in generation 2")
                return call(self, x)
            setattr(cem.ShotFitness, "__call__", failing)
        tag = resume or W
        cem.main(["--task", "lowbyte", *common, "--experts", *experts, "--shots", "4", "--population", "5",
                  "--generations", "2", "--out", str(d / f"mix-world{tag}.safetensors"),
                  "--run-dir", str(d / f"cem-world{tag}"), *(["--resume"] if resume else [])])
    elif name == "reinforce":
        import recipes
        import reinforce
        from test_reinforce import LowByteTask

        class Bandit(LowByteTask):  # right for half the bytes, which half by the question: mixed greedy rewards
            def is_correct(self, answer, example):
                return (ord(answer) + int(example.problem)) % 2 == 0
        for module in (reinforce, recipes):
            setattr(module, "get_task", lambda name, prompt=None, data_dir=None: Bandit())
        setattr(reinforce, "load", lambda args: (model, tok, model_dir))

        def run(run_name, steps, *flags):
            reinforce.main(["--task", "lowbyte", "--model", model_dir, "--targets", "all", "--steps", str(steps),
                            "--batch-size", "16", "--micro-batch", "4", "--rollout-batch", "8", "--lr", "0.05",
                            "--max-new-tokens", "1", "--baseline", "--eval-every", "1", "--eval-limit", "8",
                            "--heldout", "8", "--run-dir", str(d / run_name), "--out", str(d / f"{run_name}.safetensors"),
                            *flags])
        if W == 1:
            run("rl-world1", 2)
            run("rl-resumed", 1)  # the first step here, the second under torchrun
        else:
            run("rl-world2", 2)
            run("rl-resumed", 2, "--resume")
            run("rl-groups", 2, "--samples", "4", "--temperature", "1.0")  # each rank samples its own stream
    else:
        raise SystemExit(f"unknown scenario {name!r}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.run(_scenario, sys.argv[1], sys.argv[2])
