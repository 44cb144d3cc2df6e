"""What a reinforce.py run shows as it goes: how long the rest will take at the first step's pace,
and progress.png drawn from its log.jsonl (with matplotlib, where it is installed).

    print(pace(step, cfg, step_s, validation_s))   # "at this pace: about 14 min more (4 steps, 1 validation)"
    plot("runs/arc/log.jsonl", "runs/arc/progress.png")
"""

import json


def pace(step, cfg, step_s, validation_s, heldout_ratio=0.0):
    """What is left of a run after `step` at this pace, as a line: steps left x step_s, plus the
    validations left (after every cfg.eval_every-th step and the last) x validation_s, plus the
    held-out reading (step 0 and the step kept, each heldout_ratio of a validation). Where no
    validation was timed in this process (a resumed run), the steps alone, and it says so."""
    steps = cfg.steps - step
    validations = sum(s % cfg.eval_every == 0 or s == cfg.steps for s in range(step, cfg.steps + 1))
    parts = [f"{steps} step{'s' * (steps != 1)}"]
    seconds = steps * step_s
    if validation_s is None:
        parts.append("validations not timed yet")
    else:
        seconds += (validations + 2 * heldout_ratio) * validation_s
        parts.append(f"{validations} validation{'s' * (validations != 1)}")
        if heldout_ratio:
            parts.append("the held-out reading")
    left = f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"
    return f"at this pace: about {left} more ({', '.join(parts)})"


def plot(log_path, out_path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = [json.loads(line) for line in open(log_path)]
    steps = [r for r in rows if r["kind"] == "step"]
    evals = [r for r in rows if r["kind"] == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    key, label = ("loss", "nll per reference token (train batch)") if steps and "reward" not in steps[0] \
        else ("reward", "mean reward (train batch)")
    ax.plot([r["step"] for r in steps], [r[key] for r in steps], label=label, alpha=0.6)
    ax.plot([r["step"] for r in evals], [2 * r["accuracy"] - 1 for r in evals], "o-",
            label="validation reward (2·accuracy − 1)")
    ax.set_xlabel("step")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
