"""Where the raw task data lives.

The benchmark files are not part of the repository. They are looked up, in this order, in:

1. the directory given on the command line (`--data-dir`, passed through as `data_dir=`),
2. the environment variable `T2_DATA_DIR`,
3. `data/raw` inside the repository.

The directory holds one folder per dataset, as the public releases ship them:

    arc_easy/ARC-Easy-{train,validation,test}.jsonl     gsm8k/{train,test}.jsonl
    arc_challenge/ARC-Challenge-{...}.jsonl             mbpp/mbpp.jsonl
    humaneval/HumanEval.jsonl.gz                        math/test.jsonl   math500/test.jsonl

A file that is missing is fetched on first use (data/task.py's data_file): its dataset, and only
that one, is downloaded from its public release into the data directory by data/download.py (one
progress line; written atomically, so a failed download leaves no partial file), as checkpoints.py
fetches the default model. `--offline` (added with --data-dir by add_data_dir_argument) or
`T2_OFFLINE=1` turns this off: a missing file then raises DataNotFoundError, naming the file and how
to get it. `python -m data.download --data-dir DIR` fetches every dataset ahead of time.

This module only says where: data/download.py (its command line takes --data-dir from here) and
data/task.py (which reads the files, fetching a missing one) both build on it.
"""

import argparse
import os

ENV_VAR = "T2_DATA_DIR"
OFFLINE_VAR = "T2_OFFLINE"
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw")


class DataNotFoundError(FileNotFoundError):
    """A data file is missing; the message says which file and how to get it."""


def data_dir(override=None):
    """The data directory: `override` (the --data-dir flag), else $T2_DATA_DIR, else data/raw."""
    return os.path.abspath(override or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def offline():
    """True when missing data must not be fetched: T2_OFFLINE set (and not "0"), or --offline given."""
    return os.environ.get(OFFLINE_VAR, "") not in ("", "0")


class OfflineAction(argparse.Action):
    """--offline: sets T2_OFFLINE=1 in this process (and the processes it starts). It is read where a
    file is looked up (data.task.data_file), so the flag need not be passed through every task and call."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=False, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        os.environ[OFFLINE_VAR] = "1"
        setattr(namespace, self.dest, True)


def add_data_dir_argument(parser, offline=True):
    """Adds the shared `--data-dir` flag, and `--offline` unless offline=False, to an argparse parser
    (pass args.data_dir on to get_task; --offline takes effect by itself)."""
    parser.add_argument("--data-dir", default=None,
                        help=f"task data directory (default: ${ENV_VAR}, else {DEFAULT_DIR})")
    if offline:
        parser.add_argument("--offline", action=OfflineAction,
                            help=f"never download a missing data file; fail instead (also ${OFFLINE_VAR}=1)")
    return parser
