"""A small, strict reader and writer for the safetensors format.

Format (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length N, then N
bytes of JSON mapping each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
relative to the end of the header) plus an optional "__metadata__" dict of strings, then the raw
little-endian tensor bytes.

We read with `numpy.memmap` so a checkpoint costs no more memory than the tensors the model keeps,
and we validate everything the header claims before touching the data: a truncated or malformed
file raises `SafetensorsError` naming the file and the problem.
"""

import json
import os
import tempfile

import numpy as np
import torch

DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
MAX_HEADER = 100 * 2**20  # the reference implementation's limit


class SafetensorsError(ValueError):
    pass


def read_header(path):
    """Returns (header dict without __metadata__, metadata dict, data start offset)."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise SafetensorsError(f"{path}: {size} bytes, too short to be a safetensors file")
        n = int.from_bytes(raw, "little")
        if n > MAX_HEADER or 8 + n > size:
            raise SafetensorsError(f"{path}: header length {n} does not fit in a file of {size} bytes")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SafetensorsError(f"{path}: header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{path}: header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: tensor {name!r} has a malformed entry {info!r}") from None
        if dtype not in DTYPES:
            raise SafetensorsError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}; "
                                   f"expected one of {sorted(DTYPES)}")
        numel = int(np.prod(shape, dtype=np.int64)) if shape else 1
        nbytes = numel * torch.empty((), dtype=DTYPES[dtype]).element_size()
        if not 0 <= begin <= end <= data_len or end - begin != nbytes:
            raise SafetensorsError(
                f"{path}: tensor {name!r} ({dtype}, shape {shape}) claims bytes [{begin}, {end}) "
                f"but needs {nbytes} bytes within a data section of {data_len} bytes "
                f"(is the file truncated?)")
    return header, metadata, 8 + n


def load(path):
    """Returns ({name: tensor}, metadata). Tensors are copy-on-write views on a memory map."""
    header, metadata, start = read_header(path)
    tensors = {}
    if not header:
        return tensors, metadata
    # mode "c" (copy-on-write): the model may write into its weights (SVF swaps them in place)
    # without touching the file; pages that are only read stay shared with the page cache.
    mm = np.memmap(path, dtype=np.uint8, mode="c")
    for name, info in header.items():
        begin, end = info["data_offsets"]
        buf = mm[start + begin:start + end]
        if end > begin:
            t = torch.frombuffer(buf, dtype=DTYPES[info["dtype"]])
        else:
            t = torch.empty(0, dtype=DTYPES[info["dtype"]])
        tensors[name] = t.reshape(info["shape"])
    return tensors, metadata


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
