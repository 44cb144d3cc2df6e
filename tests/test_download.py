"""Task data fetched on first use (data/paths.py, data/download.py), from a local HTTP server.

The server runs in a thread on 127.0.0.1 (an ephemeral port) and serves small fixture files at the
paths of the public releases; T2_DATA_MIRROR points the downloads at it. Nothing here touches the
internet.
"""

import argparse
import functools
import http.server
import io
import json
import os
import threading
import urllib.parse
import zipfile

import pytest

from data import DataNotFoundError, get_task
from data import download
from data.paths import OFFLINE_VAR, add_data_dir_argument


def arc_record(i, answer="A", stem="Question"):
    """A question in AI2's release layout (not the Hugging Face one the loader reads)."""
    return {"id": f"Q{i}", "answerKey": answer,
            "question": {"stem": f"{stem} {i}?",
                         "choices": [{"text": f"option {c}{i}", "label": c} for c in "ABCD"]}}


def arc_zip():
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for subset, n in [("ARC-Easy", 4), ("ARC-Challenge", 2)]:
            for split in ("Train", "Dev", "Test"):
                # Each split's own questions: ARC-Easy's training half leaves out any test question it repeats.
                rows = [arc_record(i, "ABCD"[i % 4], "Question" if split == "Test" else f"{split} question")
                        for i in range(n)]
                z.writestr(f"ARC-V1-Feb2018-2/{subset}/{subset}-{split}.jsonl",
                           "".join(json.dumps(r) + "\n" for r in rows))
    return buf.getvalue()


def gsm8k_lines(n):
    return "".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"}) + "\n"
                   for i in range(n)).encode()


class Handler(http.server.SimpleHTTPRequestHandler):
    """Serves the fixture directory; paths in server.truncated announce twice their length and stop halfway."""

    def do_GET(self):
        self.server.requests.append(self.path)
        if self.path in self.server.truncated:
            self.send_response(200)
            self.send_header("Content-Length", "2000")
            self.end_headers()
            self.wfile.write(b"x" * 1000)
            self.wfile.flush()
            self.close_connection = True
            return
        super().do_GET()

    def log_message(self, *args):  # keep the test output clean
        pass


def mirrored(url):
    """The path a release URL has on the mirror: its path on the public server."""
    return urllib.parse.urlsplit(url).path.lstrip("/")


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    """(server, fixture directory): the releases of ARC and GSM8K, and MBPP's path truncated."""
    root = tmp_path / "mirror"
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
    server.requests, server.truncated = [], set()
    monkeypatch.setenv(download.MIRROR_VAR, f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv(OFFLINE_VAR, "0")  # conftest sets it for every other test
    files = {mirrored(download.ARC_ZIP): arc_zip(),
             mirrored(download.GSM8K.format("train")): gsm8k_lines(6),
             mirrored(download.GSM8K.format("test")): gsm8k_lines(3)}
    for relpath, data in files.items():
        (root / relpath).parent.mkdir(parents=True, exist_ok=True)
        (root / relpath).write_bytes(data)
    server.truncated.add("/" + mirrored(download.MBPP))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, root
    server.shutdown()
    server.server_close()
    thread.join()


def tree(path):
    """Every file under path, relative to it (temporary files included)."""
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path) for f in fs)


def test_a_missing_dataset_is_fetched_on_first_use_and_only_that_one(mirror, tmp_path, capsys):
    server, _ = mirror
    data = tmp_path / "data"  # does not exist yet
    test = get_task("arc_easy", data_dir=str(data)).load("test")
    assert [ex.id for ex in test] == [f"arc_easy/Q{i}" for i in range(4)] and test[1].answer == "B"
    assert tree(data) == ["arc_easy/ARC-Easy-test.jsonl", "arc_easy/ARC-Easy-train.jsonl",
                          "arc_easy/ARC-Easy-validation.jsonl"]  # not ARC-Challenge; no temporary file
    record = json.loads((data / "arc_easy" / "ARC-Easy-test.jsonl").read_text().splitlines()[0])
    assert record == {"id": "Q0", "question": "Question 0?", "answerKey": "A",  # the Hugging Face layout
                      "choices": {"text": ["option A0", "option B0", "option C0", "option D0"],
                                  "label": ["A", "B", "C", "D"]}}
    umask = os.umask(0o22)
    os.umask(umask)
    assert (data / "arc_easy" / "ARC-Easy-test.jsonl").stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "ARC-V1-Feb2018.zip" in lines[0] and lines[0].endswith("done")
    assert f"-> {data / 'arc_easy'} " in lines[0]  # where the data goes, not the temporary download
    assert len(get_task("arc_easy", data_dir=str(data)).load("train")) == 2  # even/odd of 4; no new request
    assert len(server.requests) == 1

    assert len(get_task("gsm8k", data_dir=str(data)).load("validation")) == 3  # train and test files both
    assert tree(data / "gsm8k") == ["test.jsonl", "train.jsonl"]
    assert len(capsys.readouterr().err.strip().splitlines()) == 2  # one line per file
    assert len(server.requests) == 3


def test_offline_raises_the_old_error_and_fetches_nothing(mirror, tmp_path, monkeypatch):
    server, _ = mirror
    monkeypatch.setenv(OFFLINE_VAR, "1")
    data = tmp_path / "data"
    with pytest.raises(DataNotFoundError) as err:
        get_task("gsm8k", data_dir=str(data)).load("train")
    message = str(err.value)
    assert str(data / "gsm8k" / "train.jsonl") in message and "python -m data.download gsm8k" in message
    assert server.requests == [] and not data.exists()


def test_the_offline_flag_sets_the_variable(monkeypatch):
    monkeypatch.setenv(OFFLINE_VAR, "0")
    parser = add_data_dir_argument(argparse.ArgumentParser())
    assert parser.parse_args([]).offline is False and os.environ[OFFLINE_VAR] == "0"
    assert parser.parse_args(["--offline"]).offline is True and os.environ[OFFLINE_VAR] == "1"


@pytest.mark.parametrize("dataset, why", [("mbpp", "closed after 1000 of 2000 bytes"), ("humaneval", "404")])
def test_a_failed_download_leaves_no_partial_file(mirror, tmp_path, dataset, why):
    server, _ = mirror
    data = tmp_path / "data"
    with pytest.raises(DataNotFoundError) as err:
        get_task(dataset, data_dir=str(data)).load("test")
    message = str(err.value)
    assert f"Fetching {dataset} on first use failed" in message and why in message
    assert f"python -m data.download {dataset}" in message  # the way to retry
    assert tree(data) == []  # no partial file, no temporary file
    assert len(server.requests) == 1
