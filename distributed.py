"""Several processes, one per GPU: data parallelism with torch.distributed, launched by torchrun.

    torchrun --nproc_per_node 2 evaluate_model.py --task arc_easy --split test   # items shared out
    torchrun --nproc_per_node 2 cem.py --task arc_challenge --experts ...        # members of a generation
    torchrun --nproc_per_node 2 adapt.py --strategy cls --task arc_challenge     # items
    python evaluate_model.py --task arc_easy --split test                        # one process, as always

Every script runs whole in every process (a *rank*): each loads the model, takes its share of the
work's items (`shard`), and the ranks exchange results (`gather_objects`), gradients and sums
(`sum_over_ranks`) or checks (`check_same`) through torch.distributed's collectives. Nothing here
is a scheduler of its own: torchrun starts the ranks and sets RANK, WORLD_SIZE, LOCAL_RANK and the
rendezvous address in their environment; `setup` reads them and joins the process group, NCCL for
CUDA tensors (each rank on its own GPU, cuda:LOCAL_RANK) and gloo for CPU tensors and pickled
objects ("cpu:gloo,cuda:nccl"). A plain `python script.py` has none of these variables: no process
group, world size 1, rank 0, and every helper below does what one process would do.

Only rank 0 prints and writes files (results, states, experts); the others' stdout goes to /dev/null,
their stderr (warnings, errors) stays. Files are written atomically (a temporary file, then
os.replace), so a run that stops leaves the last saved state whole.

When a rank fails, the run stops: `run(main)` prints "rank R failed: <error>" and re-raises, and
torchrun's agent, which watches its workers every 0.1 s, sends the others SIGTERM (SIGKILL 30 s
later) and prints the failure with its rank and traceback (recorded by torch's `record`, the
error file torchrun reads). A rank killed outright is reported by its signal. A rank that hangs
without dying stops the others after TIMEOUT, the process group's limit on one collective.

reinforce.py (data parallel REINFORCE, one step; objectives.rollouts_and_gradient):

    batch = step_batch(...)                               # the step's global batch, every rank alike
    mine = distributed.shard(len(batch) // K)             # this rank's questions, each with its K samples
    ... rollouts of `mine` and their rewards ...
    per_question = distributed.gather_objects(...)        # every question's rewards, in batch order, on
                                                          # every rank: the baselines are the batch's
    policy_gradient_step(..., rows=..., reduce=distributed.sum_over_ranks)
        # each half's loss is over this rank's rollouts but divided by the global B; its gradient of p
        # is summed over the ranks (one flat all_reduce per half), so p.grad is one process's
    clip_grad_norm_(...); opt.step()                      # same gradient, same p on every rank
    distributed.check_same(distributed.digest(wrapper.state()), f"p at step {step}")  # at validation
    if distributed.is_main(): save_state(); log(row)
"""

import atexit
import datetime
import hashlib
import os
import sys

import torch
import torch.distributed as dist

# The longest a rank waits in one collective for the others. Ranks meet after every evaluation
# batch, CEM generation or training step, so a wait is at most one such unit's imbalance, or rank
# 0 writing a file: minutes on a CPU. A rank that died is noticed at once (its connections close
# and torchrun stops the rest); this bounds only a rank that hangs alive.
TIMEOUT = datetime.timedelta(minutes=30)
LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


def launched():
    """True when torchrun (or another launcher) set this process's rank in the environment."""
    return all(v in os.environ for v in LAUNCH_VARIABLES)


def setup(timeout=TIMEOUT, quiet=True):
    """Joins the process group when launched by torchrun; does nothing otherwise (or twice).

    Backends by tensor device: gloo for CPU tensors and objects, NCCL for CUDA tensors where CUDA
    is, each rank on cuda:LOCAL_RANK (so `--device auto` and `cuda` mean this rank's GPU).
    quiet: the other ranks' stdout goes to /dev/null, so that the run prints one log, not N."""
    if not launched() or dist.is_initialized():
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    kwargs = {}
    if torch.cuda.is_available():
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"rank {os.environ['RANK']} has LOCAL_RANK {local_rank}, and this machine has "
                               f"{torch.cuda.device_count()} GPUs: start at most that many "
                               f"(torchrun --nproc_per_node)")
        torch.cuda.set_device(local_rank)
        kwargs = dict(backend="cpu:gloo,cuda:nccl", device_id=torch.device("cuda", local_rank))
    else:
        kwargs = dict(backend="gloo")
    dist.init_process_group(timeout=timeout, **kwargs)  # the address and rank from torchrun's variables
    if quiet and dist.get_rank() != 0:
        sys.stdout = open(os.devnull, "w")


def run(main, *args, **kwargs):
    """A script's entry point, `if __name__ == "__main__": distributed.run(main)`: setup, main,
    and on failure "rank R failed: ..." on stderr before the error propagates (torchrun then stops
    the other ranks). Under torchrun, main is wrapped in torch's `record`, which writes the error
    and its traceback where the agent reads it. In one process this is just main(*args); under
    torchrun a rank that finishes does not return: it exits with 0 here (see the end)."""
    setup()
    if not dist.is_initialized():
        return main(*args, **kwargs)
    from torch.distributed.elastic.multiprocessing.errors import record
    try:
        record(main)(*args, **kwargs)
    except BaseException as e:
        if not (isinstance(e, SystemExit) and e.code in (0, None)):
            print(f"rank {rank()} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        raise  # no destroy_process_group: it could wait on the ranks still in a collective
    # All ranks leave together: a rank that tore down its gloo group while another still used it
    # aborted in C++ at exit ("terminate called without an active exception"), seen under load.
    dist.barrier()
    dist.destroy_process_group()
    # The rank's work is done and written, and its group destroyed, yet a normal exit can still abort.
    # A gloo worker thread frees a collective's work (its tensors) just after the collective returns,
    # and freeing a tensor that Python knew takes the GIL. If the interpreter is finalizing by then,
    # the thread is ended inside that C++ destructor, and C++ calls std::terminate: SIGABRT, and
    # torchrun reports a finished run as failed. (A core dump: ~AsyncAllgatherWork -> decref_pyobject
    # -> take_gil -> pthread_exit. Ranks of tests/test_distributed.py that returned to a normal exit
    # aborted about once in eight.) So a rank ends here, without finalizing: exit handlers run and
    # streams are flushed as at a normal exit, then the process exits with 0.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    """True on the rank that prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def barrier():
    if dist.is_initialized():
        dist.barrier()


def shard(n):
    """The indices of this rank's items among n: rank, rank + W, rank + 2W, ... (strided).

    Strided, not contiguous: data files are often ordered (by source, length or difficulty), and a
    stride gives every rank a like mix of them, so the ranks finish together; the shares differ by
    at most one item. `gather_objects` puts the results back in item order."""
    return range(rank(), n, world_size())


def gather_objects(mine):
    """Every rank's `mine` (its results for the items of shard(n), in that order) -> the results
    of all n items in item order, on every rank. Objects are pickled (gloo, on the CPU)."""
    mine = list(mine)
    W = world_size()
    if W == 1:
        return mine
    shares = [None] * W
    dist.all_gather_object(shares, mine)
    out = [None] * sum(map(len, shares))
    for r, share in enumerate(shares):
        out[r::W] = share  # rank r held items r, r + W, ...
    return out


def map_items(fn, items):
    """fn(this rank's share of items) -> the results of all items, in order, on every rank.

    `fn` takes a list and returns one result per element; data.evaluate's `map_batch`."""
    items = list(items)
    mine = [items[i] for i in shard(len(items))]
    results = fn(mine) if mine else []  # a rank with no item still joins the gather
    if len(results) != len(mine):
        raise ValueError(f"rank {rank()}: {len(results)} results for {len(mine)} items")
    return gather_objects(results)


def sum_over_ranks(tensors):
    """tensors (a list) summed over the ranks, in place, and returned: the `reduce` of
    objectives.policy_gradient_step and nll_step (each half's gradient of p, and the loss's sums).
    One flat all_reduce; in one process the list itself."""
    if world_size() > 1 and tensors:
        flat = torch.cat([t.reshape(-1) for t in tensors])  # one dtype: a list of gradients, or of sums
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(part.view_as(t))
    return tensors


def digest(tensors):
    """A short sha256 of tensors ({name: tensor} in name order, or a list): the same on two
    ranks exactly when every bit is, whatever the dtype or device."""
    items = sorted(tensors.items()) if isinstance(tensors, dict) else enumerate(tensors)
    h = hashlib.sha256()
    for name, t in items:
        t = t.detach().to("cpu").contiguous().reshape(-1)
        h.update(f"{name}:{t.dtype}:{t.numel()};".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def check_same(value, what):
    """Raises RuntimeError on every rank, naming the ranks that disagree with rank 0, unless all
    ranks hold the same `value` (a digest); `what` says what it is, for the message."""
    if world_size() == 1:
        return
    values = [None] * world_size()
    dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RuntimeError(f"{what} differs across ranks: rank 0 has {values[0]}, rank(s) {differ} have "
                           f"{[values[r] for r in differ]}. Data-parallel ranks must hold identical copies; "
                           f"stop the run and --resume from the last state rank 0 saved (a GPU that "
                           f"computes differently, or ranks started with other flags, would cause this)")


def check_device(name):
    """Refuses a --device that would put two ranks on one GPU (NCCL cannot): under torchrun each
    rank takes cuda:LOCAL_RANK, which --device auto and cuda already mean."""
    if world_size() == 1 or not name.startswith("cuda:"):
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.device(name).index != local_rank:
        raise SystemExit(f"--device {name} on rank {rank()} (local rank {local_rank}): under torchrun every rank "
                         f"uses its own GPU, cuda:LOCAL_RANK; pass --device auto or cuda")
