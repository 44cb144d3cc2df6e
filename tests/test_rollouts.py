"""The official batch's machinery (issue 28): rollouts per step in groups that share a prefill, the
stop token in log pi, one option order per group, the graded reward, the cosine between the
gradients of a batch's halves, selection with a held-out slice, and a run started from an expert."""

import json

import pytest
import torch

import objectives
import reinforce
import svf
from chat import Completer
from data import get_task
from generate import generate
from logprobs import token_logprobs
from test_reinforce import LowByteTask, ShuffledLowByteTask, config, setup  # noqa: F401  (setup: a fixture)


def test_samples_share_one_prefill_and_equal_copies_of_the_prompt(setup):
    model, tok, _ = setup
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9]]
    copies = [p for p in prompts for _ in range(3)]
    greedy = generate(model, prompts, 4, samples=3, stop_tokens=(258,), pad_id=256)
    assert greedy == generate(model, copies, 4, stop_tokens=(258,), pad_id=256)
    assert greedy[0] == greedy[1] == greedy[2]
    draw = lambda ps, k: generate(model, ps, 4, temperature=1.0, samples=k, stop_tokens=(258,), pad_id=256,  # noqa: E731
                                  generator=torch.Generator().manual_seed(0))
    sampled = draw(prompts, 3)
    assert sampled == draw(copies, 1)  # the same rows, the same draws, one prefill per prompt
    assert len(set(map(tuple, sampled[:3]))) > 1


def test_the_completer_returns_each_prompts_samples_together_whatever_its_batches(setup):
    model, tok, _ = setup
    prompts = [[1, 2, 3, 4, 5, 6], [5, 6], [7, 8, 9], [10]]  # sorted by length inside, returned in order
    want = [o for o in Completer(model, tok, 3, batch_size=8).generate_ids(prompts) for _ in range(2)]
    for batch_size in (1, 2, 4, 8):
        assert Completer(model, tok, 3, batch_size=batch_size).generate_ids(prompts, samples=2) == want


def test_a_rollout_that_stopped_keeps_its_stop_token_in_log_pi(setup, monkeypatch):
    """Defect 1 of issue 28: generate dropped the stop token, so log pi of a rollout left out the
    decision to stop (nll_step's references end with it); the scorer must still not see it."""
    model, tok, path = setup
    tok.stop_tokens = set(range(128, 259))  # half the bytes stop: most sampled rollouts stop early
    seen = {}
    real = objectives.policy_gradient_step
    monkeypatch.setattr(objectives, "policy_gradient_step",
                        lambda w, m, p, completions, *a, **k: seen.update(c=completions) or real(w, m, p, completions, *a, **k))
    task = LowByteTask()
    monkeypatch.setattr(task, "score_many", lambda batch, outputs: seen.update(o=outputs) or [False] * len(batch))
    cfg = config(batch_size=16, max_new_tokens=4, temperature=1.0)
    wrapper = reinforce.make_wrapper(cfg, model, path)
    reinforce.rollouts_and_gradient(wrapper, model, tok, Completer(model, tok, 4, 1.0), task,
                                    task.load("train")[:16], cfg)
    stopped = [c for c in seen["c"] if c and c[-1] in tok.stop_tokens]
    assert stopped and all(len(c) == 4 for c in seen["c"] if c not in stopped)  # else it ran out of tokens
    assert all(t not in tok.stop_tokens for c in seen["c"] for t in c[:-1])
    assert [tok.decode(c[:-1] if c in stopped else c) for c in seen["c"]] == seen["o"]


def test_a_questions_samples_see_one_option_order(setup, tmp_path):
    """Defect 2 of issue 28: --samples K with --shuffle-options shuffled each of a question's K
    copies apart, so its group baseline compared option orders too."""
    model, tok, path = setup
    ShuffledLowByteTask.seen = []
    reinforce.train(config(steps=2, eval_every=2, shuffle_options=True, samples=4, temperature=1.0, baseline=True),
                    model, tok, path, ShuffledLowByteTask(), str(tmp_path / "run"), str(tmp_path / "run.safetensors"))
    train_steps = [b for b in ShuffledLowByteTask.seen if " v" in b[0]]
    assert len(train_steps) == 2
    for batch in train_steps:
        groups = [batch[i:i + 4] for i in range(0, 16, 4)]
        assert all(len(set(g)) == 1 for g in groups)         # one order per question
        assert len({g[0] for g in groups}) == 4             # four questions


def test_the_graded_reward_pays_for_one_option_and_never_for_a_list():
    task = get_task("arc_easy", prompt="first")
    ex = next(e for e in task.load("validation") if len(e.meta["options"]) == 4)
    right, wrong = ex.meta["options"][ex.meta["answer_index"]], ex.meta["options"][ex.meta["answer_index"] - 1]
    outputs = [right, wrong, "I do not know.", f"{right}\n{wrong}", f"{wrong} or {right}"]
    correct, paper = reinforce.rewards_of(task, [ex] * 5, outputs)
    assert correct == [True, False, False, False, False] and paper == [1.0, -1.0, -1.0, -1.0, -1.0]
    _, graded = reinforce.rewards_of(task, [ex] * 5, outputs, wrong_reward=-0.5)
    assert graded == [1.0, -0.5, -1.0, -1.0, -1.0]


def test_the_cosine_of_the_halves_is_that_of_their_gradients_and_the_sum_is_the_gradient(setup):
    model, tok, path = setup
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "all", use_cache=False, log=lambda *a: None)
    cfg = config(micro_batch=2)
    prompts = [[1, 2, 3], [4, 5], [7, 8, 9, 10], [11], [12, 13], [14, 15, 16]]
    completions = [[6, 7], [8], [9, 10, 11], [12], [13, 14], [15]]
    rewards = [1.0, -1.0, -1.0, 1.0, -1.0, 1.0]

    def grad(rows):
        for p in wrapper.parameters():
            p.grad = None
        step = objectives.policy_gradient_step(wrapper, model, [prompts[i] for i in rows],
                                               [completions[i] for i in rows], [rewards[i] for i in rows], cfg, 256)
        return step, torch.cat([p.grad.flatten() for p in wrapper.parameters()]) * len(rows)

    (step, whole), (_, a), (_, b) = grad(range(6)), grad(range(3)), grad(range(3, 6))
    # float32 sums in another order (micro-batches, threads): an error relative to the gradient's scale,
    # not a fixed 1e-8, which 2.3e-8 broke under OMP_NUM_THREADS=1; a wrong sum is off by the scale itself
    torch.testing.assert_close(whole, a + b, rtol=1e-4, atol=1e-5 * whole.abs().max().item())
    assert step["grad_cos"] == pytest.approx(torch.nn.functional.cosine_similarity(a, b, dim=0).item(), abs=1e-4)
    assert objectives.halves(8, 4) == (range(0, 4), range(4, 8)) and objectives.halves(12, 4) == (range(0, 4), range(4, 12))
    assert objectives.halves(4, 4) == (range(0, 4),)


@pytest.mark.parametrize("checkpoint", [False, True])
def test_the_cosine_of_the_halves_leaves_the_kl_term_out_and_the_gradient_keeps_it(setup, monkeypatch, checkpoint):
    """Issue 38: the KL term pulls both halves towards the base model alike, so a cosine that counted
    it read +0.57 on random rewards at kl 30. The cosine is the policy-gradient term's; the gradient
    is still eq. 1's whole loss, as one backward of it gives (also through checkpointed layers)."""
    model, tok, path = setup
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "all", use_cache=False, log=lambda *a: None)
    with torch.no_grad():
        wrapper.p[0][:5] = -3.0  # away from the base weights: the KL and its gradient are not 0
    if checkpoint:
        monkeypatch.setattr(objectives, "CHECKPOINT_TOKENS", 1)
    prompts = [[1, 2, 3], [4, 5], [7, 8, 9, 10], [11], [12, 13], [14, 15, 16]]
    completions = [[6, 7], [8], [9, 10, 11], [12], [13, 14], [15]]
    rewards = [1.0, -1.0, -1.0, 1.0, -1.0, 1.0]

    def step(kl):
        for p in wrapper.parameters():
            p.grad = None
        out = objectives.policy_gradient_step(wrapper, model, prompts, completions, rewards,
                                              config(micro_batch=2, kl=kl), 256)
        return out, torch.cat([p.grad.flatten() for p in wrapper.parameters()])

    (plain, _), (with_kl, g) = step(0.0), step(30.0)
    assert with_kl["grad_cos"] == pytest.approx(plain["grad_cos"], abs=1e-4)
    # the reference: one backward of the whole loss, through the wrapper's own forward
    for p in wrapper.parameters():
        p.grad = None
    forward = lambda ids, mask, **kw: wrapper(ids, mask, **kw)  # noqa: E731
    logp, mask, kl = token_logprobs(model, prompts, completions, 256, forward, kl=True)
    loss = -(logp.sum(1) * torch.tensor(rewards)).sum() / 6 + 30.0 * kl.sum() / 6
    loss.backward()
    want = torch.cat([p.grad.flatten() for p in wrapper.parameters()])
    torch.testing.assert_close(g, want, rtol=1e-3, atol=1e-5 * want.abs().max().item())
    assert with_kl["loss"] == pytest.approx(loss.item(), rel=1e-4)


class RecordingLowByteTask(LowByteTask):
    def __init__(self):
        super().__init__()
        self.scored = []

    def score_many(self, examples, outputs):
        self.scored.append([ex.id for ex in examples])
        return super().score_many(examples, outputs)


def test_the_held_out_items_are_read_only_at_the_end_for_step_0_and_the_step_kept(setup, tmp_path):
    model, tok, path = setup
    task = RecordingLowByteTask()
    best = reinforce.train(config(steps=4, eval_every=2, eval_limit=10, heldout=6), model, tok, path, task,
                           str(tmp_path / "run"), str(tmp_path / "run.safetensors"))
    validation = [ex.id for ex in task.load("validation")]
    heldout = set(validation[10:16])
    reads = [ids for ids in task.scored if set(ids) & heldout]
    assert len(reads) == 2 and all(set(ids) == heldout for ids in reads)
    assert task.scored[-2:] == reads                                  # the last two reads, after training
    evals = [ids for ids in task.scored if "/validation/" in ids[0] and not set(ids) & heldout]
    assert len(evals) == 3 and all(ids == validation[:10] for ids in evals)  # steps 0, 2, 4
    rows = [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]
    held = [r for r in rows if r["kind"] == "heldout"]
    assert len(held) == 1 and held[0]["items"] == 6 and held[0]["best_step"] == best["step"]
    assert all(len(r["vs_step0"]) == 3 for r in rows if r["kind"] == "eval")
    assert [r["vs_step0"][0] for r in rows if r["kind"] == "eval"][0] == 0.0
    info = svf.file_info(str(tmp_path / "run.safetensors"))
    assert info["heldout_items"] == 6 and info["heldout_accuracy"] == held[0]["accuracy"]
    assert info["dtype"] == str(next(model.parameters()).dtype).removeprefix("torch.")  # --dtype, not in the config


def test_a_run_logs_the_cosine_of_its_halves_and_its_mixed_groups(setup, tmp_path):
    run_rows = lambda: [json.loads(line) for line in open(tmp_path / "run" / "log.jsonl")]  # noqa: E731
    model, tok, path = setup
    reinforce.train(config(steps=2, eval_every=2, samples=4, temperature=1.0, baseline=True), model, tok, path,
                    LowByteTask(), str(tmp_path / "run"), str(tmp_path / "run.safetensors"))
    steps = [r for r in run_rows() if r["kind"] == "step"]
    assert all(0 <= r["mixed"] <= 4 and (r["grad_cos"] is None or -1 <= r["grad_cos"] <= 1) for r in steps)
    assert any(r["grad_cos"] is not None for r in steps)


def test_a_run_can_start_from_an_expert_and_refuses_one_of_other_targets(setup, tmp_path):
    model, tok, path = setup
    task = LowByteTask()
    reinforce.train(config(steps=4, eval_every=4), model, tok, path, task, str(tmp_path / "a"), str(tmp_path / "a.safetensors"))
    first = svf.SVF(model, svf.checkpoint_identity(path), "all", use_cache=False, log=lambda *a: None)
    trained = first.load_expert(str(tmp_path / "a.safetensors")).p
    reinforce.train(config(steps=1, eval_every=1, init=str(tmp_path / "a.safetensors")), model, tok, path, task,
                    str(tmp_path / "b"), str(tmp_path / "b.safetensors"))
    state = torch.load(tmp_path / "b" / "state.pt", weights_only=False)
    for name, p in trained.items():
        assert torch.equal(state["step0"]["p"][name], p), name  # step 0 is the expert started from
    with pytest.raises(svf.ExpertMismatch):
        reinforce.train(config(steps=1, targets="mlp", init=str(tmp_path / "a.safetensors")), model, tok, path, task,
                        str(tmp_path / "c"), str(tmp_path / "c.safetensors"))


def test_a_resumed_run_may_decode_in_other_batches_but_not_change_the_reward(setup, tmp_path):
    model, tok, path = setup
    reinforce.train(config(steps=1, eval_every=1), model, tok, path, LowByteTask(), str(tmp_path / "run"),
                    str(tmp_path / "run.safetensors"))
    args = (model, tok, path, LowByteTask(), str(tmp_path / "run"), str(tmp_path / "run.safetensors"))
    reinforce.train(config(steps=2, eval_every=1, rollout_batch=4), *args, resume=True)
    with pytest.raises(SystemExit, match="wrong_reward=-1.0/-0.5"):
        reinforce.train(config(steps=3, eval_every=1, wrong_reward=-0.5), *args, resume=True)


def test_the_cli_refuses_a_reward_outside_the_paper_and_zero(capsys):
    with pytest.raises(SystemExit):
        reinforce.main(["--task", "arc", "--wrong-reward", "0.5"])
    assert "between -1 (the paper's) and 0" in capsys.readouterr().err



def test_the_batch_baseline_is_each_halfs_mean_so_the_halves_are_independent():
    r = [1.0, -1.0, -1.0, -1.0, -1.0, 1.0, 1.0, -1.0, 1.0]
    a = objectives.advantages(r, baseline=True)
    first, second = objectives.halves(len(r))
    assert abs(a[first.start:first.stop].sum()) < 1e-6 and abs(a[second.start:second.stop].sum()) < 1e-6
    assert a.tolist()[:4] == [1.5, -0.5, -0.5, -0.5]


def test_micro_batches_hold_at_most_their_tokens_and_the_gradient_does_not_depend_on_it(setup, monkeypatch):
    lengths = [3, 4, 5, 9, 9, 10, 30]
    prompts, completions = [[1] * (n - 2) for n in lengths], [[2, 3]] * len(lengths)
    batches = list(objectives.micro_batches(prompts, completions, 4, max_tokens=20))
    assert [(s.start, s.stop) for s, _ in batches] == [(0, 3), (3, 5), (5, 6), (6, 7)]  # 3 x 5, 2 x 9, 10, 30
    assert [ck for _, ck in batches] == [False] * 4
    model, tok, path = setup
    wrapper = svf.SVF(model, svf.checkpoint_identity(path), "all", use_cache=False, log=lambda *a: None)
    grads = []
    for cap in (8, 1000):
        monkeypatch.setattr(objectives, "MICRO_BATCH_TOKENS", cap)
        for p in wrapper.parameters():
            p.grad = None
        objectives.policy_gradient_step(wrapper, model, [[1, 2, 3], [4, 5], [7, 8, 9, 10], [11]],
                                        [[6, 7], [8], [9, 10, 11], [12]], [1.0, -1.0, -1.0, 1.0], config(), 256)
        grads.append(torch.cat([p.grad.flatten() for p in wrapper.parameters()]))
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-8)
