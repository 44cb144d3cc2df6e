"""A small, strict reader and writer for the safetensors format.

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, then N
bytes of JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the end of the header) plus an optional "__metadata__" dict of strings, then the raw
little-endian tensor bytes.

We read with `numpy.memmap` so a checkpoint costs no more memory than the tensors the model keeps,
and we validate everything the header claims before touching the data: a truncated or malformed
file raises `SafetensorsError` naming the file and the problem. A path that is not a regular file (a
FIFO, a device, a socket, a folder) is refused before it is opened, since opening a FIFO for reading
waits for a writer forever (open_regular). `load(..., finite=True)`, what expert and LoRA files are
read with, also refuses a tensor holding NaN or an infinity, which would make every logit NaN.
"""

import json
import math
import os
import stat
import tempfile

import numpy as np
import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit
ENTRY_KEYS = {"dtype", "shape", "data_offsets"}
MAX_DIMS = 64  # numpy's limit; no model weight has more than a handful
MAX_INDEX = 2**63  # a tensor's sizes and strides are int64: each dimension, and their product, must fit
KINDS = [(stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
         (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")]


class SafetensorsError(ValueError):
    pass


def open_regular(path, error=SafetensorsError, what="file"):
    """`path` opened for reading in binary, after checking, without opening it, that it is a regular
    file (a symbolic link to one is fine); `error` naming the path and what it is otherwise.

    Opening a FIFO for reading blocks until something writes to it, and opening a device can have
    effects of its own, so we look first (os.stat). The file is then opened with O_NONBLOCK, which
    changes nothing for a regular file but keeps open() from waiting should the path have been
    replaced by a FIFO in between, and checked again through the descriptor (os.fstat)."""
    before = os.stat(path)  # FileNotFoundError, PermissionError: already name the path
    if not stat.S_ISREG(before.st_mode):
        kind = next((name for test, name in KINDS if test(before.st_mode)), "not a regular file")
        raise error(f"{path} is {kind}, not a regular file; expected a {what}")
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    after = os.fstat(fd)
    if not stat.S_ISREG(after.st_mode) or (after.st_dev, after.st_ino) != (before.st_dev, before.st_ino):
        os.close(fd)
        raise error(f"{path} changed while it was being opened (it is no longer the regular file it was); "
                    f"expected a {what}")
    os.set_blocking(fd, True)  # ordinary reads from here on
    return os.fdopen(fd, "rb")


def _unique_keys(pairs):
    """object_pairs_hook for json.loads: a key given twice is refused (plain json keeps the last one)."""
    keys = [k for k, _ in pairs]
    twice = sorted({k for k in keys if keys.count(k) > 1})
    if twice:
        raise SafetensorsError(f"the header names {twice} more than once")
    return dict(pairs)


def _refuse_constant(name):
    raise SafetensorsError(f"the header holds {name}, which JSON does not allow")


def _count(value):
    """A JSON integer (not a bool, float or string) >= 0, else None."""
    return value if type(value) is int and value >= 0 else None


def read_header(path):
    """Returns (header dict without __metadata__, metadata dict, data start offset). Everything the
    header claims is checked here, before any tensor is touched: each entry is
    {"dtype": one of DTYPES, "shape": [int >= 0, ...], "data_offsets": [begin, end]}, the tensors
    follow one another in the data section without gaps or overlap and fill it exactly (as the
    reference reader requires), and __metadata__ maps strings to strings."""
    with open_regular(path, what="safetensors file") as f:
        return _read_header(f, path)


def _read_header(f, path):
    """read_header of the file `f` opened from `path` (named in the errors)."""
    size = os.fstat(f.fileno()).st_size
    raw = f.read(8)
    if len(raw) < 8:
        raise SafetensorsError(f"{path}: {size} bytes, too short to be a safetensors file")
    n = int.from_bytes(raw, "little")
    if n > MAX_HEADER or 8 + n > size:
        raise SafetensorsError(f"{path}: header length {n} does not fit in a file of {size} bytes")
    try:
        header = json.loads(f.read(n), object_pairs_hook=_unique_keys, parse_constant=_refuse_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    except SafetensorsError as e:
        raise SafetensorsError(f"{path}: {e}") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is a JSON {type(header).__name__}, expected an object")
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise SafetensorsError(f"{path}: __metadata__ must map strings to strings, found {str(metadata)[:200]}")
    data_len = size - 8 - n
    spans = []
    for name, info in header.items():
        if not isinstance(info, dict) or set(info) != ENTRY_KEYS:
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry {str(info)[:200]}; "
                                   f"expected an object with exactly the keys {sorted(ENTRY_KEYS)}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has dtype {dtype!r}; expected one of {sorted(DTYPES)}")
        if not isinstance(shape, list) or any(_count(d) is None for d in shape):
            raise SafetensorsError(f"{path}: tensor {name!r} has shape {str(shape)[:200]}; "
                                   f"expected a list of integers >= 0")
        if not isinstance(offsets, list) or len(offsets) != 2 or any(_count(o) is None for o in offsets):
            raise SafetensorsError(f"{path}: tensor {name!r} has data_offsets {offsets!r}; "
                                   f"expected [begin, end], two integers >= 0")
        nbytes = math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size()  # Python ints: no overflow
        begin, end = offsets
        if end - begin != nbytes or end > data_len:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({dtype}, shape {str(shape)[:200]}) claims bytes [{begin}, {end}) "
                f"but needs {nbytes} bytes within a data section of {data_len} bytes "
                f"(is the file truncated?)")
        # A zero in the shape makes the tensor empty whatever the other dimensions claim, so the byte
        # count above cannot catch them: torch would fail on them (TypeError, RuntimeError) unnamed.
        if len(shape) > MAX_DIMS or math.prod(d for d in shape if d) >= MAX_INDEX:
            raise SafetensorsError(f"{path}: tensor {name!r} has shape {str(shape)[:200]}; expected at most "
                                   f"{MAX_DIMS} dimensions whose nonzero product is below 2**63")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise SafetensorsError(f"{path}: tensor {name!r} starts at byte {begin} of the data section, expected "
                                   f"{position}: the tensors must follow one another without gaps or overlap")
        position = end
    if position != data_len:
        raise SafetensorsError(f"{path}: the tensors end at byte {position} of a data section of {data_len} bytes; "
                               f"expected them to fill it")
    return header, metadata, 8 + n


def load(path, dtype=None, finite=False):
    """Returns ({name: tensor}, metadata). Tensors are copy-on-write views on a memory map. With
    `dtype` (a torch dtype), a file holding a tensor of another dtype is refused before any is read;
    with `finite`, one holding a NaN or an infinity is refused, naming the tensor (check_finite)."""
    with open_regular(path, what="safetensors file") as f:  # one open: the map is of the file checked
        header, metadata, start = _read_header(f, path)
        if dtype is not None:
            other = {name: info["dtype"] for name, info in header.items() if DTYPES[info["dtype"]] != dtype}
            if other:
                raise SafetensorsError(f"{path}: expected every tensor in {NAMES.get(dtype, dtype)}, found "
                                       f"{dict(sorted(other.items())[:4])}{' ...' if len(other) > 4 else ''}")
        tensors = {}
        if not header:
            return tensors, metadata
        # mode "c" (copy-on-write): the model may write into its weights (SVF swaps them in place)
        # without touching the file; pages that are only read stay shared with the page cache.
        mm = np.memmap(f, dtype=np.uint8, mode="c")  # the map keeps its own descriptor: closing f is fine
    for name, info in header.items():
        begin, end = info["data_offsets"]
        buf = mm[start + begin:start + end]
        if end > begin:
            t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]])
        else:
            t = torch.empty(0, dtype=DTYPES[info["dtype"]])
        tensors[name] = t.reshape(info["shape"])
    if finite:
        check_finite(path, tensors)
    return tensors, metadata


def check_finite(path, tensors):
    """Refuses (SafetensorsError naming the file and the tensor) floating tensors holding NaN or +-inf:
    one such value in an expert's p or a LoRA factor makes W', and then every logit, NaN."""
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = (~torch.isfinite(t)).nonzero()[0].tolist()
            raise SafetensorsError(f"{path}: tensor {name!r} holds {int((~torch.isfinite(t)).sum())} non-finite "
                                   f"values (NaN or an infinity), the first {t[tuple(bad)].item()} at index {bad}; "
                                   f"expected finite numbers (was the run that wrote it diverging?)")


def save(path, tensors, metadata=None):
    """Writes {name: tensor} atomically: to a temporary file in the same folder, then renamed."""
    header, offset = {}, 0
    items = sorted(tensors.items())
    for name, t in items:
        if t.dtype not in NAMES:
            raise SafetensorsError(f"cannot save tensor {name!r} of dtype {t.dtype}")
        nbytes = t.numel() * t.element_size()
        header[name] = {"dtype": NAMES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # align the data section to 8 bytes, as the reference writer does
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".safetensors")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(raw).to_bytes(8, "little"))
            f.write(raw)
            for _, t in items:
                t = t.detach().contiguous().cpu()
                # view as bytes so bfloat16 (which numpy lacks) is written unchanged
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file ordinary permissions
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
