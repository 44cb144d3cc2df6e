"""Where the raw task data lives.

The benchmark files are not part of the repository. They are looked up, in this order, in:

1. the directory given on the command line (`--data-dir`, passed through as `data_dir=`),
2. the environment variable `T2_DATA_DIR`,
3. `data/raw` inside the repository.

The directory holds one folder per dataset, as the public releases ship them:

    arc_easy/ARC-Easy-{train,validation,test}.jsonl     gsm8k/{train,test}.jsonl
    arc_challenge/ARC-Challenge-{...}.jsonl             mbpp/mbpp.jsonl
    humaneval/HumanEval.jsonl.gz                        math/test.jsonl   math500/test.jsonl

A file that is missing is fetched on first use: its dataset, and only that one, is downloaded from
its public release into the data directory by data/download.py (one progress line; written
atomically, so a failed download leaves no partial file), as checkpoints.py fetches the default
model. `--offline` (added with --data-dir by add_data_dir_argument) or `T2_OFFLINE=1` turns this off:
a missing file then raises DataNotFoundError, naming the file and how to get it.
`python -m data.download --data-dir DIR` fetches every dataset ahead of time.
"""

import argparse
import gzip
import json
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


def data_file(relpath, override=None):
    """Absolute path of `relpath` (e.g. "gsm8k/train.jsonl") inside the data directory. A missing
    file's dataset is fetched first (data/download.py), unless offline(); a file that is still
    missing raises DataNotFoundError naming the expected path and how to obtain it."""
    root = data_dir(override)
    path = os.path.join(root, relpath)
    if os.path.isfile(path):
        return path
    source = ("the --data-dir flag" if override else f"${ENV_VAR}" if os.environ.get(ENV_VAR)
              else f"the default (set ${ENV_VAR} or pass --data-dir to change it)")
    dataset = relpath.split("/")[0]
    message = (f"expected the data file {path} but it does not exist.\n"
               f"  The data directory {root} comes from {source}.\n"
               f"  To obtain the file: python -m data.download {dataset} --data-dir {root}  (needs internet),\n"
               f"  or point ${ENV_VAR} at a directory that holds {relpath}.")
    if offline():
        raise DataNotFoundError(message + f"\n  (Not fetched on first use: ${OFFLINE_VAR} is set or --offline was given.)")
    from . import download  # the only module that touches the network
    if dataset not in download.DATASETS:
        raise DataNotFoundError(message)
    try:
        download.fetch(dataset, root)
    except Exception as e:  # any failure of the download or of reading the release: say so, and how to retry
        raise DataNotFoundError(f"{message}\n  Fetching {dataset} on first use failed: {e}") from e
    if not os.path.isfile(path):
        raise DataNotFoundError(f"{message}\n  The release of {dataset} was fetched but has no {relpath}.")
    return path


def read_jsonl(relpath, override=None):
    """The records of a JSON-lines file (optionally gzip-compressed) in the data directory."""
    path = data_file(relpath, override)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


class OfflineAction(argparse.Action):
    """--offline: sets T2_OFFLINE=1 in this process (and the processes it starts). It is read where a
    file is looked up (data_file), so the flag need not be passed through every task and call."""

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
