"""Downloads the task data from the public releases into the data directory (needs internet).

    python -m data.download                         # everything, into $T2_DATA_DIR or data/raw
    python -m data.download gsm8k mbpp --data-dir /somewhere

Only this script touches the network; the tasks and the tests read local files.
The files are written in the layout data/paths.py describes. ARC comes from AI2's release and is
rewritten in the Hugging Face `allenai/ai2_arc` record layout; MATH comes from the original
tarball and is written as one JSON line per problem, subjects in alphabetical order and problems
in file-number order (`idx` counts them; another export of MATH may order the problems differently).
"""

import argparse
import io
import json
import os
import re
import tarfile
import urllib.request
import zipfile

from .paths import add_data_dir_argument, data_dir

ARC_ZIP = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
MBPP = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"
HUMANEVAL = "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz"
MATH_TAR = "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"
MATH500 = "https://raw.githubusercontent.com/openai/prm800k/main/prm800k/math_splits/test.jsonl"


def fetch(url):
    print(f"downloading {url}", flush=True)
    with urllib.request.urlopen(url, timeout=120) as response:
        return response.read()


def write(root, relpath, data):
    path = os.path.join(root, relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
    print(f"wrote {path}")


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def arc(root, subset):
    """AI2's {"question": {"stem", "choices": [{"text", "label"}]}} -> the Hugging Face layout."""
    archive = zipfile.ZipFile(io.BytesIO(fetch(ARC_ZIP)))
    folder = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
    for ai2_split, split in [("Train", "train"), ("Dev", "validation"), ("Test", "test")]:
        name = next(n for n in archive.namelist() if n.endswith(f"{subset}/{subset}-{ai2_split}.jsonl"))
        rows = []
        for line in archive.read(name).decode().splitlines():
            r = json.loads(line)
            choices = r["question"]["choices"]
            rows.append(dict(id=r["id"], question=r["question"]["stem"], answerKey=r["answerKey"],
                             choices=dict(text=[c["text"] for c in choices],
                                          label=[c["label"] for c in choices])))
        write(root, f"{folder}/{subset}-{split}.jsonl", jsonl(rows))


def math_full(root):
    archive = tarfile.open(fileobj=io.BytesIO(fetch(MATH_TAR)))
    members = [m for m in archive.getmembers() if re.search(r"/test/[^/]+/\d+\.json$", m.name)]
    members.sort(key=lambda m: (m.name.split("/")[-2], int(m.name.split("/")[-1][:-5])))
    rows = [dict(json.load(archive.extractfile(m)), idx=i) for i, m in enumerate(members)]
    write(root, "math/test.jsonl", jsonl(rows))


DATASETS = {
    "arc_easy": lambda root: arc(root, "ARC-Easy"),
    "arc_challenge": lambda root: arc(root, "ARC-Challenge"),
    "gsm8k": lambda root: [write(root, f"gsm8k/{s}.jsonl", fetch(GSM8K.format(s))) for s in ("train", "test")],
    "mbpp": lambda root: write(root, "mbpp/mbpp.jsonl", fetch(MBPP)),
    "humaneval": lambda root: write(root, "humaneval/HumanEval.jsonl.gz", fetch(HUMANEVAL)),
    "math": math_full,
    "math500": lambda root: write(root, "math500/test.jsonl", fetch(MATH500)),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", help=f"which datasets (default: all of {', '.join(DATASETS)})")
    add_data_dir_argument(parser)
    args = parser.parse_args()
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; expected some of {list(DATASETS)}")
    root = data_dir(args.data_dir)
    for name in args.datasets or DATASETS:
        DATASETS[name](root)


if __name__ == "__main__":
    main()
