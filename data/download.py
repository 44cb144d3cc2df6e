"""Downloads the task data from the public releases into the data directory (needs internet).

    python -m data.download                         # everything, into $T2_DATA_DIR or data/raw
    python -m data.download gsm8k mbpp --data-dir /somewhere

You rarely need to run it: a task whose file is missing fetches its own dataset, and only that one,
the first time it is read (data/task.py's data_file), as checkpoints.py fetches the default model. Every
script's `--offline` flag, or T2_OFFLINE=1, turns that off: a missing file then raises
DataNotFoundError, naming the file and this command.

Each download prints one progress line, and every file is written atomically: into a temporary
file in the data directory, renamed into place (os.replace) once it is complete. An interrupted or
failed download leaves no partial file, so a file that exists is whole.

The files are written in the layout data/paths.py describes. ARC comes from AI2's release and is
rewritten in the Hugging Face `allenai/ai2_arc` record layout; MATH comes from the original
tarball and is written as one JSON line per problem, subjects in alphabetical order and problems
in file-number order (`idx` counts them; another export of MATH may order the problems differently).

`T2_DATA_MIRROR=http://HOST:PORT` fetches every release from that server instead, at the path it has
in its public URL (a local mirror; the tests serve small fixture files that way on 127.0.0.1).
Only this module touches the network.
"""

import argparse
import contextlib
import json
import os
import re
import secrets
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile

from .paths import add_data_dir_argument, data_dir

MIRROR_VAR = "T2_DATA_MIRROR"
ARC_ZIP = "https://ai2-public-datasets.s3.amazonaws.com/arc/ARC-V1-Feb2018.zip"
GSM8K = "https://raw.githubusercontent.com/openai/grade-school-math/master/grade_school_math/data/{}.jsonl"
MBPP = "https://raw.githubusercontent.com/google-research/google-research/master/mbpp/mbpp.jsonl"
HUMANEVAL = "https://raw.githubusercontent.com/openai/human-eval/master/data/HumanEval.jsonl.gz"
MATH_TAR = "https://people.eecs.berkeley.edu/~hendrycks/MATH.tar"
MATH500 = "https://raw.githubusercontent.com/openai/prm800k/main/prm800k/math_splits/test.jsonl"


def release_url(url):
    """The public URL, or the same path on $T2_DATA_MIRROR when that is set."""
    mirror = os.environ.get(MIRROR_VAR)
    return mirror.rstrip("/") + urllib.parse.urlsplit(url).path if mirror else url


def size(n):
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.0f} kB"


@contextlib.contextmanager
def atomic_file(path):
    """Yields a new temporary file next to `path`, open for binary writing; renames it to `path` when
    the block ends without an error, and removes it otherwise."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{os.getpid()}-{secrets.token_hex(4)}.part")
    try:
        with open(tmp, "xb") as f:  # "x": a new file, with the permissions of the umask
            yield f
        os.replace(tmp, path)  # same directory, so the rename is atomic
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def download(url, path, into=None):
    """Downloads `url` (or its mirror) to the file `path`, atomically, printing one progress line
    on stderr (redrawn in place on a terminal, written once elsewhere) that names `into` (default:
    the file's directory) as where the data goes."""
    url = release_url(url)
    line = f"downloading {url} -> {into or os.path.dirname(path)}"
    progress = Progress(line)
    done = 0
    try:
        with atomic_file(path) as f, urllib.request.urlopen(url, timeout=120) as response:
            total = int(response.headers.get("Content-Length") or 0)
            while chunk := response.read(1 << 20):
                f.write(chunk)
                done += len(chunk)
                progress.update(f"{line}: {size(done)}" + (f" of {size(total)}" if total else ""))
            if total and done != total:
                raise OSError(f"{url}: the connection closed after {done} of {total} bytes")
    except BaseException:
        progress.end(f"{line}: failed after {size(done)}")
        raise
    progress.end(f"{line}: {size(done)}, done")
    return path


class Progress:
    """One line on stderr. On a terminal it is redrawn (a carriage return, then the new text padded
    over the old); elsewhere, a log, the start is written once and the end completes the line."""

    def __init__(self, start):
        self.tty, self.width, self.last = sys.stderr.isatty(), len(start), 0.0
        sys.stderr.write(start if self.tty else start + " ...")
        sys.stderr.flush()

    def update(self, text):
        if self.tty and time.monotonic() - self.last > 0.25:
            self.draw(text)
            self.last = time.monotonic()

    def draw(self, text):
        sys.stderr.write("\r" + text.ljust(self.width))
        self.width = max(self.width, len(text))
        sys.stderr.flush()

    def end(self, text):
        if self.tty:
            self.draw(text)
        else:
            sys.stderr.write(" " + text.rsplit(": ", 1)[-1])
        sys.stderr.write("\n")
        sys.stderr.flush()


def write(root, relpath, data):
    """Writes the bytes `data` to root/relpath atomically."""
    with atomic_file(os.path.join(root, relpath)) as f:
        f.write(data)


def jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def arc(root, subset):
    """AI2's {"question": {"stem", "choices": [{"text", "label"}]}} -> the Hugging Face layout."""
    folder = "arc_easy" if subset == "ARC-Easy" else "arc_challenge"
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        archive = zipfile.ZipFile(download(ARC_ZIP, os.path.join(tmp, "ARC.zip"), os.path.join(root, folder)))
        files = {}
        for ai2_split, split in [("Train", "train"), ("Dev", "validation"), ("Test", "test")]:
            names = [n for n in archive.namelist() if n.endswith(f"{subset}/{subset}-{ai2_split}.jsonl")]
            if not names:
                raise ValueError(f"{ARC_ZIP} holds no {subset}/{subset}-{ai2_split}.jsonl")
            rows = []
            for line in archive.read(names[0]).decode().splitlines():
                r = json.loads(line)
                choices = r["question"]["choices"]
                rows.append(dict(id=r["id"], question=r["question"]["stem"], answerKey=r["answerKey"],
                                 choices=dict(text=[c["text"] for c in choices],
                                              label=[c["label"] for c in choices])))
            files[f"{folder}/{subset}-{split}.jsonl"] = jsonl(rows)
    for relpath, data in files.items():  # all three read before any is written
        write(root, relpath, data)


def math_full(root):
    with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
        with tarfile.open(download(MATH_TAR, os.path.join(tmp, "MATH.tar"), os.path.join(root, "math"))) as archive:
            members = [m for m in archive.getmembers() if re.search(r"/test/[^/]+/\d+\.json$", m.name)]
            members.sort(key=lambda m: (m.name.split("/")[-2], int(m.name.split("/")[-1][:-5])))
            rows = [dict(json.load(archive.extractfile(m)), idx=i) for i, m in enumerate(members)]
    write(root, "math/test.jsonl", jsonl(rows))


def gsm8k(root):
    for split in ("train", "test"):
        download(GSM8K.format(split), os.path.join(root, "gsm8k", f"{split}.jsonl"))


# dataset (the folder in the data directory) -> function(root) that writes its files
DATASETS = {
    "arc_easy": lambda root: arc(root, "ARC-Easy"),
    "arc_challenge": lambda root: arc(root, "ARC-Challenge"),
    "gsm8k": gsm8k,
    "mbpp": lambda root: download(MBPP, os.path.join(root, "mbpp", "mbpp.jsonl")),
    "humaneval": lambda root: download(HUMANEVAL, os.path.join(root, "humaneval", "HumanEval.jsonl.gz")),
    "math": math_full,
    "math500": lambda root: download(MATH500, os.path.join(root, "math500", "test.jsonl")),
}


def fetch(name, root):
    """Writes dataset `name` (a key of DATASETS) into the data directory `root`."""
    os.makedirs(root, exist_ok=True)
    DATASETS[name](root)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("datasets", nargs="*", help=f"which datasets (default: all of {', '.join(DATASETS)})")
    add_data_dir_argument(parser, offline=False)
    args = parser.parse_args()
    unknown = sorted(set(args.datasets) - set(DATASETS))
    if unknown:
        parser.error(f"unknown dataset(s) {unknown}; expected some of {list(DATASETS)}")
    root = data_dir(args.data_dir)
    for name in args.datasets or DATASETS:
        fetch(name, root)
        print(f"{name}: done, in {os.path.join(root, name)}")


if __name__ == "__main__":
    main()
