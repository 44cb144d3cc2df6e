"""Where the raw task data lives.

The benchmark files are not part of the repository. They are looked up, in this order, in:

1. the directory given on the command line (`--data-dir`, passed through as `data_dir=`),
2. the environment variable `T2_DATA_DIR`,
3. `data/raw` inside the repository.

The directory holds one folder per dataset, as the public releases ship them:

    arc_easy/ARC-Easy-{train,validation,test}.jsonl     gsm8k/{train,test}.jsonl
    arc_challenge/ARC-Challenge-{...}.jsonl             mbpp/mbpp.jsonl
    humaneval/HumanEval.jsonl.gz                        math/test.jsonl   math500/test.jsonl

`python -m data.download --data-dir DIR` fetches them (needs internet; nothing else does).
"""

import gzip
import json
import os

ENV_VAR = "T2_DATA_DIR"
DEFAULT_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "raw")


class DataNotFoundError(FileNotFoundError):
    """A data file is missing; the message says which file and how to get it."""


def data_dir(override=None):
    """The data directory: `override` (the --data-dir flag), else $T2_DATA_DIR, else data/raw."""
    return os.path.abspath(override or os.environ.get(ENV_VAR) or DEFAULT_DIR)


def data_file(relpath, override=None):
    """Absolute path of `relpath` (e.g. "gsm8k/train.jsonl") inside the data directory; raises
    DataNotFoundError naming the expected path and how to obtain it when it does not exist."""
    root = data_dir(override)
    path = os.path.join(root, relpath)
    if not os.path.isfile(path):
        source = ("the --data-dir flag" if override else f"${ENV_VAR}" if os.environ.get(ENV_VAR)
                  else f"the default (set ${ENV_VAR} or pass --data-dir to change it)")
        dataset = relpath.split("/")[0]
        raise DataNotFoundError(
            f"expected the data file {path} but it does not exist.\n"
            f"  The data directory {root} comes from {source}.\n"
            f"  To obtain the file: python -m data.download {dataset} --data-dir {root}  (needs internet),\n"
            f"  or point ${ENV_VAR} at a directory that holds {relpath}.")
    return path


def read_jsonl(relpath, override=None):
    """The records of a JSON-lines file (optionally gzip-compressed) in the data directory."""
    path = data_file(relpath, override)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def add_data_dir_argument(parser):
    """Adds the shared `--data-dir` flag to an argparse parser (pass args.data_dir on to get_task)."""
    parser.add_argument("--data-dir", default=None,
                        help=f"task data directory (default: ${ENV_VAR}, else {DEFAULT_DIR})")
    return parser
