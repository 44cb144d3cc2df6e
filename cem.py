"""Few-shot adaptation with the cross-entropy method (CEM): Transformer-Squared section 3.2, strategy (c).

Given K experts z_1..z_K and a handful of examples of a new task, search the mixing coefficients
alpha of  z' = sum_k alpha_k z_k  (svf.SVF.mix) that answer those examples best. Table 2's few-shot
rows, one search per task (then see adapt.py's docstring for the evaluation):

    E="experts/arc.safetensors experts/gsm8k.safetensors experts/mbpp.safetensors"
    # the shipped mixes, experts/fewshot-<task>.safetensors (the defaults, 32 x 50, take hours here):
    python cem.py --task arc_challenge --experts $E --population 16 --generations 5
    python cem.py --task math500 --experts $E --population 10 --generations 3
    python cem.py --task humaneval --experts $E --population 10 --generations 3
    python cem.py --task arc_challenge --experts $E --per-matrix --out experts/fewshot-arc_challenge-pm.safetensors
    python adapt.py --strategy fewshot --task arc_challenge   # evaluates the mix on the test split minus the shots

Each search scores population x generations mixes (32 x 50 by default) on the shots: a recomposition
of W' and a greedy generation for the shots per mix, about 12 s on one CPU core for the default model
and 10 ARC shots (16 x 5 took 971 s; 32 x 50 would take 5.4 hours; HumanEval's and MATH-500's
longer answers cost 79 and 100 s a member, and their shipped mixes are 10 x 3), so `--population` and
`--generations` trade time for search, and the search prints
what a member and a generation cost. It keeps its state and every member's alpha, fitness and shot
outputs in --run-dir (runs/cem-<task>), so `--resume` continues an interrupted search, or extends a
finished one with a larger --generations.

On several GPUs, `torchrun --nproc_per_node N cem.py ...` (distributed.py) shares out the members of
each generation: every member is scored whole (all shots, one batch) by one process, so its fitness
is the one a single process gives; the fitnesses are gathered, and every process refits the same
mean and std. Rank 0 alone prints and writes the state, members.jsonl and the mix.

`cem()` is the method written generically: sample a population from N(mean, std^2), clip it to the
bounds, score every member, refit mean and std to the best `elite_ratio` of them. Fitness may be a
tuple, compared lexicographically. Defaults follow the official code (population 32, elite ratio
0.2, alpha starting at 1/K with std 0.5 in [0, 1], 10 shots, about 50 generations).

Fitness of alpha = (accuracy on the shots, mean log-likelihood): ties in accuracy, frequent with 10
shots, are broken by the mean per-token log-likelihood, under the mixed weights, of a correct
completion of each shot. We use the *reference* answer written out as the prompt asks for it
(`task.reference_completion`, data/: the letter for ARC's letter prompt, the worked solution for
GSM8K and MATH, the reference program for the code tasks, the target reinforce.py's `--objective
nll` trains on); it exists for every shot, so it also rewards progress on
the shots still answered wrongly. Where no reference completion fits the prompt (ARC's official
chain-of-thought prefill), we fall back to the official rule: the model's own outputs on the shots
it answered correctly.

Nothing leaks: the shots are `data.split_shots(task.load(split), shots, seed=16)`, as the official
FewShotTask draws them, by default from the *test* split (the only split HumanEval and MATH have).
Their ids are stored in the output file, and adapt.py removes them from every split it evaluates.

The output is an ordinary expert file (loadable by svf, evaluate_model.py --expert, adapt.py) whose
vectors p' = logit(z' / (2 max z')) reproduce z' up to a per-matrix factor, which the SVF rescaling
sum(sigma) / sum(sigma * z) cancels. Its metadata ("info") holds alpha, the component experts with
digests of their vectors, the shot ids, the fitness and the search history. We keep alpha >= 0 by
default: the sigmoid makes every expert's z positive, and a mix must be too to be stored as p'.
"""

import argparse
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field

import torch

import distributed
import lora
import run_state
import safetensors_io
import svf
from data import get_task, split_shots
from chat import MAX_NEW_TOKENS, Completer, add_model_arguments, completion_ids, load
from logprobs import token_logprobs

say = functools.partial(print, flush=True)  # progress lines show up at once, also in a log file


# ----------------------------------------------------------------------------- the method, generic

@dataclass
class CEMResult:
    best: torch.Tensor   # (dim,) the best member of the last generation
    fitness: tuple       # its fitness
    mean: torch.Tensor   # (dim,) the final sampling distribution
    std: torch.Tensor    # (dim,)
    history: list = field(default_factory=list)  # one dict per generation


def _key(fitness):
    """A fitness as a tuple of floats, NaN as -inf, so that members sort lexicographically."""
    values = fitness if isinstance(fitness, (tuple, list)) else (fitness,)
    return tuple(-math.inf if math.isnan(float(v)) else float(v) for v in values)


def _fmt(key):
    return "/".join(f"{v:.4f}" for v in key)


def cem(fitness_fn, dim, population=32, elite_ratio=0.2, generations=50, init_mean=0.0, init_std=0.5,
        bounds=None, seed=0, log=say, state=None, on_generation=None):
    """Maximises fitness_fn(x), x a (dim,) float tensor, by the cross-entropy method.

    fitness_fn returns a number or a tuple (compared lexicographically: (accuracy, tie-break)).
    init_mean, init_std: numbers or (dim,) tensors. bounds: (low, high), numbers or (dim,) tensors;
    samples are clipped to them, as in the official code.

    Member 0 of every generation is the previous generation's best (at first: the initial mean),
    evaluated again rather than remembered. Fitness is noisy: sampled decoding, or a handful of
    shots on which one lucky alpha can score high once. A remembered score would keep such a lucky
    member forever; re-evaluated, it has to earn its place in each generation. Ties are won by the
    lower index, so the incumbent keeps its place against an equally good newcomer.

    Under torchrun, each process scores its share of the members (distributed.shard) and all get
    every fitness (gather_objects): the same generation as in one process, in population order.

    Resumable: `on_generation(state)` is called after each generation with everything the search
    needs to go on (generation, mean, std, best, its fitness, the random state, the history), and
    `state` (such a dict) continues from there, up to `generations` in all: so a search can be
    interrupted, or extended with more generations, and ends where an uninterrupted one would.
    """
    g = torch.Generator(device="cpu").manual_seed(seed)  # the search is a few numbers: the CPU, always
    low, high = bounds if bounds is not None else (-math.inf, math.inf)
    low, high = (torch.as_tensor(b, dtype=torch.float32, device="cpu") for b in (low, high))
    n_elite = min(max(2, int(elite_ratio * population)), population)  # one elite has std 0: the search would stop
    if state is None:
        mean = torch.clamp(torch.zeros(dim, device="cpu") + init_mean, low, high)  # (dim,)
        std = torch.zeros(dim, device="cpu") + init_std  # (dim,)
        best, best_key, history, start = mean.clone(), None, [], 1
    else:
        mean, std, best, best_key = state["mean"], state["std"], state["best"], tuple(state["fitness"])
        history, start = list(state["history"]), state["generation"] + 1
        g.set_state(state["rng"])
    for gen in range(start, generations + 1):
        t0 = time.perf_counter()
        pop = torch.clamp(mean + std * torch.randn(population, dim, generator=g, device="cpu"), low, high)  # (P, dim)
        pop[0] = best
        mine = [_key(fitness_fn(pop[i].clone())) for i in distributed.shard(population)]  # all, in one process
        keys = distributed.gather_objects(mine)  # every member's, in population order
        order = sorted(range(population), key=lambda i: keys[i], reverse=True)  # stable: ties keep index order
        elites = pop[order[:n_elite]]  # (n_elite, dim)
        mean, std = elites.mean(0), elites.std(0, correction=1 if n_elite > 1 else 0)
        best, best_key = pop[order[0]].clone(), keys[order[0]]
        distributed.check_same(distributed.digest([mean, std, best]), f"the CEM distribution after generation {gen}")
        finite = [k[0] for k in keys if math.isfinite(k[0])]
        row = dict(generation=gen, best=list(best_key), best_x=best.tolist(),
                   population_mean=sum(finite) / max(len(finite), 1), std=std.mean().item(),
                   seconds=time.perf_counter() - t0)
        history.append(row)
        x = f" at {[round(v, 3) for v in row['best_x']]}" if dim <= 8 else ""
        log(f"cem {gen:3d}/{generations} | best {_fmt(best_key)}{x} | population mean "
            f"{row['population_mean']:.4f} | mean std {row['std']:.4f} | {row['seconds']:.1f}s")
        if on_generation is not None:
            on_generation(dict(generation=gen, mean=mean, std=std, best=best, fitness=list(best_key),
                               rng=g.get_state(), history=history))
    return CEMResult(best, best_key, mean, std, history)


# ----------------------------------------------------------------------------- experts

def load_experts(model, model_dir, paths, **svf_kwargs):
    """(SVF wrapper, [Expert]) for expert files that must fit this checkpoint and share their targets."""
    targets = {}
    for path in paths:
        if not os.path.exists(path):
            raise FileNotFoundError(f"expert file {path} does not exist (train one with reinforce.py)")
        meta = safetensors_io.read_header(path)[1]
        if meta.get("format") == lora.LORA_FORMAT:
            raise svf.ExpertMismatch(f"{path} is a LoRA file: mixing experts or routing between them (cem.py, adapt.py "
                                     f"--strategy prompt, cls, fewshot) needs SVF experts, whose z vectors mix; "
                                     f"a LoRA file works alone, with evaluate_model.py --expert or adapt.py --strategy expert")
        if meta.get("format") != svf.EXPERT_FORMAT:
            raise svf.ExpertMismatch(f"{path}: format {meta.get('format')!r}, expected {svf.EXPERT_FORMAT!r} "
                                     f"(is it an SVF expert file?)")
        svf.expert_metadata(path, meta)  # its targets are one of svf.TARGETS
        # its vectors (a few KB), refused if not finite float32 before the wrapper's SVD is made
        safetensors_io.load(path, dtype=torch.float32, finite=True)
        targets[path] = meta["targets"]
    if len(set(targets.values())) > 1:
        raise svf.ExpertMismatch(f"experts to mix or switch between must adapt the same matrices, found targets "
                                 f"{targets}; train them with the same reinforce.py --targets")
    wrapper = svf.SVF(model, svf.checkpoint_identity(model_dir), next(iter(targets.values())), **svf_kwargs)
    return wrapper, [wrapper.load_expert(path) for path in paths]  # load_expert checks the checkpoint


def expert_digest(expert):
    """sha256 of an expert's vectors, so that a mix notices a component retrained since the search."""
    h = hashlib.sha256()
    for name in sorted(expert.p):
        h.update(name.encode() + expert.p[name].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def save_mix(wrapper, path, experts, alpha, **info):
    """Writes z' = mix(experts, alpha) as an expert file, p' = logit(z' / (2 max z')) per matrix.

    Dividing by 2 max z' puts z'/c in (0, 0.5], where sigmoid(logit(.)) round-trips to float
    precision; the factor c is common to a matrix, and the SVF rescaling cancels it.
    """
    z = wrapper.mix(experts, alpha)
    if any(bool((v <= 0).any()) for v in z.values()):
        raise ValueError("the mix has scales <= 0, which an expert file (z = sigmoid(p)) cannot store; "
                         "keep alpha >= 0 (--bounds 0 1)")
    p = {name: torch.logit(v / (2 * v.max())) for name, v in z.items()}
    components = [dict(path=e.path, digest=expert_digest(e), task=e.info.get("task")) for e in experts]
    alpha = torch.as_tensor(alpha, device="cpu").tolist()
    wrapper.save_expert(path, p, kind="fewshot-mix", alpha=alpha, experts=components, **info)


def mix_from_file(wrapper, path):
    """(z', info) of a file written by save_mix: z' = mix(components, alpha), exactly as the search
    scored it. Refuses components that are missing or have changed since (their digests)."""
    info = wrapper.load_expert(path).info
    if info.get("kind") != "fewshot-mix":
        raise ValueError(f"{path} is a single expert, not a few-shot mix written by cem.py")
    check_mix_info(path, info, len(wrapper.names))
    experts = []
    for c in info["experts"]:
        found = c["path"] if os.path.exists(c["path"]) else os.path.join(os.path.dirname(path),
                                                                          os.path.basename(c["path"]))
        if not os.path.exists(found):
            raise FileNotFoundError(f"{path} mixes {c['path']}, which does not exist any more")
        e = wrapper.load_expert(found)
        if expert_digest(e) != c["digest"]:
            raise ValueError(f"{found} changed since cem.py mixed it into {path}; run cem.py again")
        experts.append(e)
    z = wrapper.mix(experts, info["alpha"])
    for name, v in z.items():  # finite alpha can still overflow (1e38 each), or be 0 for a matrix: no W'
        if not bool(torch.isfinite(v).all()) or not bool((v > 0).all()):
            raise ValueError(f"{path}: its alpha {str(info['alpha'])[:200]} mixes scales for {name!r} that are not "
                             f"all finite and > 0 (found {v.min().item():.4g} to {v.max().item():.4g}); "
                             f"run cem.py again")
    return z, info


def check_mix_info(path, info, n_matrices):
    """Refuses (ValueError naming the file) a mix whose info is not what save_mix writes: components
    {path, digest} and alpha, K finite numbers or K lists of n_matrices. The info is JSON, and Python's
    json reads NaN and Infinity, which would make every scale, W' and logit NaN."""
    experts, alpha = info.get("experts"), info.get("alpha")
    if not isinstance(experts, list) or not experts or not all(isinstance(c, dict) and isinstance(c.get("path"), str)
                                                               and isinstance(c.get("digest"), str) for c in experts):
        raise ValueError(f"{path}: its info's experts are {str(experts)[:200]}; expected a list of "
                         f"{{'path': ..., 'digest': ...}}, as cem.py writes")
    K = len(experts)
    finite_row = lambda row: isinstance(row, list) and all(  # noqa: E731
        type(a) in (int, float) and math.isfinite(a) for a in row)
    per_expert = finite_row(alpha) and len(alpha) == K
    per_matrix = (isinstance(alpha, list) and len(alpha) == K
                  and all(finite_row(row) and len(row) == n_matrices for row in alpha))
    if not (per_expert or per_matrix):
        raise ValueError(f"{path}: its alpha is {str(alpha)[:200]}; expected {K} finite numbers (one per "
                         f"component) or {K} lists of {n_matrices}, as cem.py writes")


# ----------------------------------------------------------------------------- the few-shot search

class ShotFitness:
    """fitness(x) = (accuracy on the shots, mean log-likelihood) of the mix with alpha = x.reshape(K, -1)."""

    def __init__(self, wrapper, experts, task, shots, completer):
        self.wrapper, self.experts, self.task, self.shots, self.completer = wrapper, experts, task, shots, completer
        self.evaluated = []  # (alpha, fitness, outputs of the shots) of each call since it was last emptied
        tok = completer.tok
        self.prompts = [completer.encode(ex.messages) for ex in shots]
        gold = [task.reference_completion(ex) for ex in shots]
        self.gold = [None if g is None else completion_ids(tok, ex.messages, g) for ex, g in zip(shots, gold)]

    def __call__(self, x):
        alpha = x.reshape(len(self.experts), -1)  # (K, 1) or (K, n_matrices)
        alpha = alpha[:, 0] if alpha.shape[1] == 1 else alpha
        z = self.wrapper.mix(self.experts, alpha)
        # Scales <= 0 (alpha all zero for a matrix, or negative alpha) give no usable W': sum(sigma * z)
        # is 0 or the matrix flips; such members are never elites.
        if any(bool((v <= 0).any()) for v in z.values()):
            self.evaluated.append((x.tolist(), (-math.inf, -math.inf), None))
            return (-math.inf, -math.inf)
        with torch.no_grad():
            weights = self.wrapper.weights(z)
        with self.wrapper.applied(weights=weights), torch.no_grad():
            outputs = self.completer.generate_ids(self.prompts)
            correct = self.task.score_many(self.shots, [self.completer.tok.decode(o) for o in outputs])
            items = []  # (prompt, completion): the reference where there is one, else a correct own output
            for prompt, gold, output, ok in zip(self.prompts, self.gold, outputs, correct):
                completion = gold if gold is not None else (output if ok else None)
                if completion:
                    items.append((prompt, completion))
            loglik = 0.0  # the official value when there is nothing to score
            if items:
                logp, mask = token_logprobs(self.wrapper.model, [p for p, _ in items], [c for _, c in items],
                                            self.completer.tok.pad_id)
                loglik = (logp.sum(1) / mask.sum(1)).mean().item()  # per-token mean, then over items
        fitness = (sum(correct) / len(correct), loglik)
        self.evaluated.append((x.tolist(), fitness, [self.completer.tok.decode(o) for o in outputs]))
        return fitness


@dataclass
class FewShotConfig:
    task: str = "arc_challenge"
    prompt: str = None  # None: the task's default prompt
    shots: int = 10
    shot_split: str = "test"  # the official FewShotTask draws from the split it evaluates
    shot_seed: int = 16  # official
    population: int = 32
    elite_ratio: float = 0.2
    generations: int = 50
    init_std: float = 0.5
    bounds: tuple = (0.0, 1.0)
    per_matrix: bool = False
    max_new_tokens: int = 0  # 0: per task (chat.MAX_NEW_TOKENS)
    batch_size: int = 16
    seed: int = 0


def search(cfg, model, tok, model_dir, task, expert_paths, out, log=say, run_dir=None, resume=False, **svf_kwargs):
    """Runs the alpha search of cfg for `task` and writes the mix to `out`; returns the CEMResult.

    With `run_dir`, the search state is written there after every generation (state.pt), and every
    member evaluated, with its alpha, fitness and the outputs of the shots, to members.jsonl;
    `resume` continues that search, to cfg.generations in all (more than before extends it)."""
    shots, _ = split_shots(task.load(cfg.shot_split), cfg.shots, seed=cfg.shot_seed)
    wrapper, experts = load_experts(model, model_dir, expert_paths, log=log, **svf_kwargs)
    completer = Completer(model, tok, cfg.max_new_tokens or MAX_NEW_TOKENS.get(task.name, 256),
                          batch_size=cfg.batch_size, seed=cfg.seed)
    fitness = ShotFitness(wrapper, experts, task, shots, completer)
    K, n = len(experts), len(wrapper.names) if cfg.per_matrix else 1
    log(f"few-shot search: {K} experts, {K * n} coefficients, {len(shots)} shots from {task.name}/{cfg.shot_split}, "
        f"{cfg.population} x {cfg.generations} evaluations")
    state, save = None, None
    if run_dir:
        state_path, members_path = os.path.join(run_dir, "state.pt"), os.path.join(run_dir, "members.jsonl")
        digests = [expert_digest(e) for e in experts]
        if resume:
            if not os.path.exists(state_path):
                raise SystemExit(f"--resume: no search state at {state_path}; start without --resume")
            state = run_state.load_state(state_path, "cem")  # tensors, numbers and strings only: no pickled code runs
            same = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "generations"}
            if {k: v for k, v in state["config"].items() if k != "generations"} != same or state["experts"] != digests:
                raise SystemExit(f"--resume: {run_dir} holds a search with other settings or experts "
                                 f"({state['config']}); only --generations may change")
            if state["mean"].shape != (K * n,):
                raise run_state.StateFileError(f"{state_path}: its mean has shape {tuple(state['mean'].shape)}; "
                                               f"this search has {K * n} coefficients")
            log(f"resuming the search in {run_dir} after generation {state['generation']}")
        elif os.path.exists(state_path):
            raise SystemExit(f"{state_path} exists: pass --resume to continue that search, or choose another --run-dir")
        os.makedirs(run_dir, exist_ok=True)

        def save(s):  # after each generation: the members it evaluated, then the state to go on from
            evaluated = distributed.gather_objects(fitness.evaluated)  # every process's members, in order
            fitness.evaluated.clear()
            if not distributed.is_main():
                return
            with open(members_path, "a") as f:
                for i, (alpha, fit, outputs) in enumerate(evaluated):
                    f.write(json.dumps(dict(generation=s["generation"], member=i, alpha=alpha, fitness=list(fit),
                                            outputs=outputs)) + "\n")
            run_state.save_state(dict(s, config=dataclasses.asdict(cfg), experts=digests), state_path, "cem")
    t0 = time.perf_counter()
    result = cem(fitness, K * n, cfg.population, cfg.elite_ratio, cfg.generations, 1.0 / K, cfg.init_std,
                 cfg.bounds, cfg.seed, log, state=state, on_generation=save)
    alpha = result.best.reshape(K, n)[:, 0] if n == 1 else result.best.reshape(K, n)  # (K,) or (K, n)
    seconds = sum(row["seconds"] for row in result.history)
    if distributed.is_main():
        save_mix(wrapper, out, experts, alpha, task=task.name, prompt=task.prompt, fitness=list(result.fitness),
                 shots=dict(split=cfg.shot_split, seed=cfg.shot_seed, ids=[ex.id for ex in shots]),
                 config=dataclasses.asdict(cfg), wall_s=seconds, history=result.history,
                 world_size=distributed.world_size())
    shown = alpha.mean(-1) if n > 1 else alpha  # (K,): per expert, averaged over matrices with --per-matrix
    members = cfg.population * len(result.history)
    log(f"alpha {[round(a, 4) for a in shown.tolist()]}{' (mean over matrices)' if n > 1 else ''}; "
        f"on the shots: accuracy/log-likelihood {_fmt(result.fitness)}; wrote {out}")
    log(f"cost: {seconds:.0f}s for {members} members ({seconds / max(members, 1):.2f}s a member, "
        f"{seconds / max(len(result.history), 1):.1f}s a generation, {len(shots)} shots each); "
        f"this run {time.perf_counter() - t0:.0f}s")
    return result


def main(argv=None):
    d = FewShotConfig()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(ap)
    ap.add_argument("--task", required=True, help="arc_challenge, humaneval, math500, ...")
    ap.add_argument("--prompt", default=d.prompt, help="prompt variant (default: the task's default)")
    ap.add_argument("--experts", nargs="+", required=True, help="expert files to mix (same targets)")
    ap.add_argument("--shots", type=int, default=d.shots, help="few-shot examples (default: %(default)s, official)")
    ap.add_argument("--shot-split", default=d.shot_split, help="split the shots come from; adapt.py leaves them "
                    "out of its evaluation (default: %(default)s, as the official code)")
    ap.add_argument("--shot-seed", type=int, default=d.shot_seed, help="data.split_shots seed (default: %(default)s)")
    ap.add_argument("--population", type=int, default=d.population, help="(default: %(default)s, official)")
    ap.add_argument("--elite-ratio", type=float, default=d.elite_ratio, help="(default: %(default)s, official)")
    ap.add_argument("--generations", type=int, default=d.generations, help="(default: %(default)s)")
    ap.add_argument("--init-std", type=float, default=d.init_std, help="(default: %(default)s, official)")
    ap.add_argument("--bounds", type=float, nargs=2, default=d.bounds, metavar=("LOW", "HIGH"),
                    help="alpha is clipped to [LOW, HIGH] (default: 0 1)")
    ap.add_argument("--per-matrix", action="store_true", help="one alpha per expert and matrix (default: per expert)")
    ap.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens, help="0: per task")
    ap.add_argument("--seed", type=int, default=d.seed)
    ap.add_argument("--out", default=None, help="output expert file (default: experts/fewshot-<task>.safetensors)")
    ap.add_argument("--run-dir", default=None,
                    help="the search state and every member's outputs (default: runs/cem-<task>[-per-matrix])")
    ap.add_argument("--resume", action="store_true",
                    help="continue the search in --run-dir (a larger --generations extends it)")
    args = ap.parse_args(argv)
    missing = [p for p in args.experts if not os.path.exists(p)]
    if missing:
        ap.error(f"expert files not found: {missing} (train them with reinforce.py)")
    if args.population < 2 or args.generations < 1 or not 0 < args.elite_ratio <= 1 or args.shots < 1:
        ap.error("need --population >= 2, --generations >= 1, --shots >= 1 and 0 < --elite-ratio <= 1")
    if args.bounds[0] >= args.bounds[1]:
        ap.error(f"--bounds {args.bounds[0]} {args.bounds[1]}: LOW must be below HIGH")
    names = {f.name for f in dataclasses.fields(FewShotConfig)}
    cfg = FewShotConfig(**{k: v for k, v in vars(args).items() if k in names})
    cfg.bounds = tuple(cfg.bounds)
    task = get_task(cfg.task, prompt=cfg.prompt, data_dir=args.data_dir)
    task.load(cfg.shot_split)  # fail on missing data before loading the model
    distributed.check_device(args.device)
    model, tok, model_dir = load(args)
    out = args.out or os.path.join("experts", f"fewshot-{task.name}.safetensors")
    run_dir = args.run_dir or os.path.join("runs", f"cem-{task.name}{'-per-matrix' if cfg.per_matrix else ''}")
    return search(cfg, model, tok, model_dir, task, args.experts, out, run_dir=run_dir, resume=args.resume)


if __name__ == "__main__":
    distributed.run(main)
