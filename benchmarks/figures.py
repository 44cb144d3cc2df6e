"""The paper's Figures 4 and 5 from our runs: routing confusion matrices and the few-shot mixing weights.

    python -m benchmarks.figures --routing runs/t2-*-prompt.json runs/t2-*-cls.json \
        --mixes experts/fewshot-*.safetensors --out docs/figures
    python -m benchmarks.figures --runs runs/arc-b256 runs/arc-g64x4 --out docs/figures

- Figure 4 (`routing.png`): for each strategy of pass 1 (`prompt`, `cls`), the share of each task's
  questions that went to each expert, from `adapt.py --out` files (their "confusion" lists). Files
  of one strategy are added together, so the Table 2 runs on ARC-Challenge, MATH-500 and HumanEval
  make one matrix, as in the paper; a `--task cls --classify-only` run makes its own.
- Figure 5 (`alpha.png`): the alpha that cem.py found for each task, one bar per expert (for a
  per-matrix search, the mean over matrices, with its spread as an error bar).
- Training runs side by side (`runs.png`, not a figure of the paper): from reinforce.py run
  directories (their log.jsonl), each validation's paired difference against step 0 with its 95%
  interval, and each step's cosine between the gradients of its two halves (signal or noise).

Needs matplotlib, which is not a dependency: without it the script says so and exits. The numbers
behind each figure are printed too, so nothing is lost without the pictures.
"""

import argparse
import json
import os
from collections import defaultdict

import svf
from adapt import CATEGORIES


def routing_matrices(paths):
    """{strategy: {true category: {chosen category: n}}} summed over adapt.py --out files."""
    out = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        if "confusion" not in saved:
            raise ValueError(f"{path} holds no routing (write it with adapt.py --strategy prompt|cls --out)")
        for cell in saved["confusion"]:
            out[saved["strategy"]][cell["true"]][cell["chosen"]] += cell["n"]
    return out


def mix_alphas(paths):
    """[(task, [expert names], mean alpha per expert, spread per expert)] of cem.py mix files."""
    rows = []
    for path in paths:
        info = svf.file_info(path)
        if info.get("kind") != "fewshot-mix":
            raise ValueError(f"{path} is not a few-shot mix written by cem.py")
        alpha = info["alpha"]  # (K,) or (K, n_matrices)
        names = [e.get("task") or os.path.basename(e["path"]) for e in info["experts"]]
        if alpha and isinstance(alpha[0], list):
            means = [sum(a) / len(a) for a in alpha]
            spread = [(sum((x - m) ** 2 for x in a) / len(a)) ** 0.5 for a, m in zip(alpha, means)]
        else:
            means, spread = list(alpha), [0.0] * len(alpha)
        rows.append((info["task"], names, means, spread))
    return rows


def run_curves(run_dirs):
    """{run name: {"eval": [(step, accuracy, diff, lo, hi)], "cos": [(step, cosine)]}} from reinforce.py
    run directories. A resumed run may log a step twice (the step in progress when it stopped): the
    last row of a step is the one its state kept."""
    out = {}
    for run_dir in run_dirs:
        path = os.path.join(run_dir, "log.jsonl")
        if not os.path.exists(path):
            raise ValueError(f"{run_dir} holds no log.jsonl (a run directory of reinforce.py was expected)")
        evals, steps = {}, {}
        with open(path) as f:
            for row in map(json.loads, f):
                if row["kind"] == "eval":
                    evals[row["step"]] = (row["step"], row["accuracy"], *row.get("vs_step0", (None,) * 3))
                elif row["kind"] == "step" and row.get("grad_cos") is not None:
                    steps[row["step"]] = (row["step"], row["grad_cos"])
        out[os.path.basename(os.path.normpath(run_dir))] = {"eval": [evals[k] for k in sorted(evals)],
                                                             "cos": [steps[k] for k in sorted(steps)]}
    return out


def draw_runs(plt, curves, path):
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for name, c in curves.items():
        shown = [e for e in c["eval"] if e[2] is not None]
        if shown:
            steps, diffs = [e[0] for e in shown], [100 * e[2] for e in shown]
            errs = [[100 * (e[2] - e[3]) for e in shown], [100 * (e[4] - e[2]) for e in shown]]
            top.errorbar(steps, diffs, yerr=errs, marker="o", capsize=3, label=name)
        if c["cos"]:
            bottom.plot([s for s, _ in c["cos"]], [x for _, x in c["cos"]], marker=".", label=name)
    top.axhline(0, color="grey", lw=0.8)
    top.set_ylabel("validation vs step 0 (points)")
    top.legend(fontsize=8)
    bottom.axhline(0, color="grey", lw=0.8)
    bottom.set_ylabel("cos(halves' gradients)")
    bottom.set_xlabel("step")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def print_routing(matrices):
    for strategy, rows in matrices.items():
        print(f"routing, {strategy}: rows are the true category, columns the chosen one")
        print(f"{'':>10}" + "".join(f"{c:>10}" for c in CATEGORIES))
        for true in CATEGORIES:
            if true in rows:
                print(f"{true:>10}" + "".join(f"{rows[true].get(c, 0):>10}" for c in CATEGORIES))


def draw_routing(plt, matrices, path):
    strategies = sorted(matrices)
    fig, axes = plt.subplots(1, len(strategies), figsize=(4.2 * len(strategies), 3.6), squeeze=False)
    for ax, strategy in zip(axes[0], strategies):
        rows = [t for t in CATEGORIES if t in matrices[strategy]]
        counts = [[matrices[strategy][t].get(c, 0) for c in CATEGORIES] for t in rows]
        shares = [[n / max(sum(r), 1) for n in r] for r in counts]
        ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
        for i, r in enumerate(counts):
            for j, n in enumerate(r):
                ax.text(j, i, f"{shares[i][j]:.0%}\n({n})", ha="center", va="center", fontsize=8,
                        color="white" if shares[i][j] > 0.6 else "black")
        ax.set_xticks(range(len(CATEGORIES)), CATEGORIES)
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("expert chosen in pass 1")
        ax.set_ylabel("category of the task")
        ax.set_title(f"{strategy}")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def draw_alphas(plt, rows, path):
    fig, ax = plt.subplots(figsize=(2.8 + 1.8 * len(rows), 3.4))
    experts = sorted({n for _, names, _, _ in rows for n in names})
    width = 0.8 / max(len(experts), 1)
    for k, expert in enumerate(experts):
        xs, ys, es = [], [], []
        for i, (task, names, means, spread) in enumerate(rows):
            if expert in names:
                xs.append(i + (k - (len(experts) - 1) / 2) * width)
                ys.append(means[names.index(expert)])
                es.append(spread[names.index(expert)])
        ax.bar(xs, ys, width, yerr=es if any(es) else None, label=expert, capsize=2)
    ax.set_xticks(range(len(rows)), [task for task, *_ in rows])
    ax.set_ylabel("alpha")
    ax.set_title("few-shot mixing weights found by CEM", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--routing", nargs="*", default=[], help="adapt.py --out files of --strategy prompt / cls")
    ap.add_argument("--mixes", nargs="*", default=[], help="few-shot mix files written by cem.py")
    ap.add_argument("--runs", nargs="*", default=[], help="reinforce.py run directories (log.jsonl)")
    ap.add_argument("--out", default="docs/figures", help="folder for routing.png, alpha.png and runs.png")
    args = ap.parse_args(argv)
    matrices, rows, curves = routing_matrices(args.routing), mix_alphas(args.mixes), run_curves(args.runs)
    print_routing(matrices)
    for name, c in curves.items():
        print(f"{name}: validation " + ", ".join(f"step {s} {a:.1%}" + ("" if d is None else f" ({d:+.1%})")
                                                 for s, a, d, _, _ in c["eval"])
              + (f"; mean cos(halves) {sum(x for _, x in c['cos']) / len(c['cos']):+.2f}" if c["cos"] else ""))
    for task, names, means, spread in rows:
        print(f"alpha, {task}: " + ", ".join(f"{n} {m:.3f}" + (f" (sd {s:.3f})" if s else "")
                                              for n, m, s in zip(names, means, spread)))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no pictures (pip install matplotlib to draw them)")
        return []
    os.makedirs(args.out, exist_ok=True)
    written = []
    if matrices:
        written.append(os.path.join(args.out, "routing.png"))
        draw_routing(plt, matrices, written[-1])
    if rows:
        written.append(os.path.join(args.out, "alpha.png"))
        draw_alphas(plt, rows, written[-1])
    if curves:
        written.append(os.path.join(args.out, "runs.png"))
        draw_runs(plt, curves, written[-1])
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    main()
