"""benchmarks/probe_arc.py: the calibration that separates a letter habit from knowledge, and the
batched option scores, on the real default model."""

import torch

from benchmarks.probe_arc import calibrated_choice, option_scores
from data.task import Example, system, user
from chat import Completer
from logprobs import token_logprobs


def test_calibration_removes_a_fixed_letter_preference_and_keeps_the_signal():
    gold = torch.tensor([0, 1, 2, 3] * 5)
    habit = torch.tensor([-3.0, -0.1, -2.0, -4.0])                # always "B" when read raw
    lp = habit + 0.5 * torch.nn.functional.one_hot(gold, 4)       # a small preference for the answer
    assert (lp.argmax(1) == 1).all()
    assert torch.equal(calibrated_choice(lp), gold)
    assert not torch.equal(calibrated_choice(habit.expand(20, 4)), gold)   # no signal: nothing to find


def test_option_scores_in_batches_equal_each_option_scored_alone(default_model):
    model, tok = default_model
    comp = Completer(model, tok)
    examples = [Example(f"q{i}", q, [], "A", meta=dict(question=q, options=opts)) for i, (q, opts) in enumerate([
        ("What do plants need to make food?", ["sunlight", "sand", "a magnet"]),
        ("Which is a mammal?", ["whale", "shark", "trout", "an octopus with eight long arms"]),
    ])]
    messages = lambda ex: [system("Answer the question."), user(ex.meta["question"])]
    batched = option_scores(model, comp, tok, examples, messages, batch_rows=4)   # rows of both questions mixed
    with torch.no_grad():
        for ex, scores in zip(examples, batched):
            assert scores.shape == (len(ex.meta["options"]),)
            for opt, score in zip(ex.meta["options"], scores):
                alone, _ = token_logprobs(model, [comp.encode(messages(ex))], [tok.encode(opt)], tok.pad_id)
                assert abs(alone.sum().item() - score.item()) < 1e-3, (opt, alone.sum().item(), score.item())
    assert batched[0].argmax() == 0 and batched[1].argmax() == 0   # sunlight, whale
