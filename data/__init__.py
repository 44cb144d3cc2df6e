"""Tasks of Transformer²: loaders, splits, prompts, answer extraction and scoring, a sandbox for
generated code, and evaluation. Nothing here imports torch or the model.

    from data import get_task, evaluate
    task = get_task("arc_easy", prompt="official")   # prompt variants: task.prompts
    examples = task.load("validation")
    result = evaluate(task, "validation", complete_fn)

Tasks (see each module's docstring for splits and scoring):
    arc_easy (alias arc), arc_challenge   arc.py
    gsm8k                                 gsm8k.py
    mbpp, humaneval                       mbpp.py, humaneval.py (run in sandbox.py)
    math, math500                         hendrycks_math.py (+ mathnorm.py)
    cls                                   cls.py: the classification expert's task
"""

from .arc import ArcChallengeTask, ArcTask
from .cls import ClsTask
from .evaluate import Record, Result, evaluate, paired_difference, wilson_interval
from .gsm8k import Gsm8kTask
from .hendrycks_math import Math500Task, MathTask
from .humaneval import HumanEvalTask
from .mbpp import MbppTask
from .paths import DataNotFoundError, add_data_dir_argument, data_dir
from .task import Example, Task, split_shots

TASKS = {cls.name: cls for cls in [ArcTask, ArcChallengeTask, Gsm8kTask, MbppTask, HumanEvalTask,
                                   MathTask, Math500Task, ClsTask]}
ALIASES = {"arc": "arc_easy"}


def get_task(name, prompt=None, data_dir=None):
    """The task called `name` (or an alias), with prompt variant `prompt` (default: the task's
    default_prompt) reading from `data_dir` (default: $T2_DATA_DIR, else data/raw)."""
    key = ALIASES.get(name, name)
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; expected one of {sorted(TASKS) + sorted(ALIASES)}")
    return TASKS[key](prompt=prompt, data_dir=data_dir)


__all__ = ["get_task", "TASKS", "ALIASES", "evaluate", "data_dir", "add_data_dir_argument", "Example", "Task",
           "Result", "Record", "paired_difference", "wilson_interval", "split_shots", "DataNotFoundError"]
