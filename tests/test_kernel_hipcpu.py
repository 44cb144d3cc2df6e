"""kernels/svf_recompose.cu run on the CPU with ROCm's HIP-CPU runtime, checked against float64.

No GPU has run the kernel yet. HIP-CPU (header-only, read from ../shared/hip-cpu) runs each GPU thread
as a fiber, switching fibers at __syncthreads, with __shared__ memory per block, so g++ compiles and
runs the same source nvcc does: its indexing, edges, shared tiles, barriers, bfloat16 conversions
and the backward's partial sums. kernels/hipcpu_driver.cpp calls the launchers the torch binding
calls, on host memory, and hands the outputs back between guard bytes, NaN where not written.
The builds are cached by the sources' digest (~/.cache/transformer2/hipcpu). What this cannot show: README, "On a GPU".
"""

import concurrent.futures
import hashlib
import math
import os
import re
import shutil
import struct
import subprocess
import tempfile

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "kernels", "svf_recompose.cu")
DRIVER = os.path.join(ROOT, "kernels", "hipcpu_driver.cpp")
HIP_CPU = os.path.join(os.path.dirname(ROOT), "shared", "hip-cpu")
# Beside the model (checkpoints.cache_dir()), not in a shared /tmp where others could plant a binary.
CACHE = os.path.join(os.environ.get("T2_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "transformer2"),
                     "hipcpu")
FLAGS = ["-std=c++17", "-O2", "-DSVF_HIP_CPU", "-I" + os.path.join(HIP_CPU, "include"),
         "-I" + os.path.join(os.path.dirname(torch.__file__), "include")]  # c10/util/BFloat16.h
LIBS = ["-ltbb", "-lpthread"]  # libstdc++'s parallel algorithms, which HIP-CPU runs blocks with, use TBB


def missing():
    """Why the kernel cannot be built here, or None."""
    if not shutil.which("g++"):
        return "no g++ on PATH (HIP-CPU needs g++ >= 9)"
    version = subprocess.run(["g++", "-dumpversion"], capture_output=True, text=True).stdout.strip()
    if int(version.split(".")[0] or 0) < 9:
        return f"g++ {version} is older than 9, which HIP-CPU needs"
    if not os.path.exists(os.path.join(HIP_CPU, "include", "hip", "hip_runtime.h")):
        return f"no HIP-CPU runtime at {HIP_CPU} (include/hip/hip_runtime.h)"
    probe = subprocess.run(["g++", "-E", "-x", "c++", "-"], input="#include <tbb/version.h>\n",
                           capture_output=True, text=True)
    if probe.returncode:
        return "no oneTBB headers for HIP-CPU's parallel algorithms (apt-get install libtbb-dev)"
    return None


REASON = missing()
pytestmark = pytest.mark.skipif(REASON is not None, reason=str(REASON))


# ----------------------------------------------------------------------------- building

def digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:16]


def compiler_identity():
    gxx = subprocess.run(["g++", "--version"], capture_output=True, text=True).stdout
    commit_file = os.path.join(HIP_CPU, "COMMIT")
    hip = open(commit_file).read() if os.path.exists(commit_file) else os.path.getmtime(HIP_CPU)
    return gxx, hip, torch.__version__, FLAGS, LIBS


def gxx(args, what):
    """Runs g++; a failure names what was built and shows the compiler's message."""
    p = subprocess.run(["g++", *args], capture_output=True, text=True, timeout=600)
    if p.returncode:
        raise RuntimeError(f"g++ failed building {what}:\n{p.stderr[-4000:]}")


def cached(path, make):
    """path if it exists, else make(tmp) then an atomic rename: parallel runs never see half a file."""
    if not os.path.exists(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
        os.close(fd)
        try:
            make(tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    return path


def build(kernel_source):
    """The driver linked with kernel_source (a .cu file), in CACHE by the digest of both."""
    ident = compiler_identity()
    with open(DRIVER, "rb") as f, open(kernel_source, "rb") as k:
        driver_key, kernel_key = digest(f.read(), *ident), digest(k.read(), *ident)
    driver_o = os.path.join(CACHE, f"driver-{driver_key}.o")
    kernel_o = os.path.join(CACHE, f"kernel-{kernel_key}.o")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # both compile at once on two cores
        jobs = [pool.submit(cached, driver_o, lambda out: gxx([*FLAGS, "-c", DRIVER, "-o", out], DRIVER)),
                pool.submit(cached, kernel_o, lambda out: gxx(
                    [*FLAGS, "-x", "c++", "-c", kernel_source, "-o", out], kernel_source))]
        for job in jobs:
            job.result()
    exe = os.path.join(CACHE, f"hipcpu_driver-{digest(driver_key, kernel_key)}")
    return cached(exe, lambda out: gxx([driver_o, kernel_o, "-o", out, *LIBS], "the HIP-CPU driver"))


@pytest.fixture(scope="module")
def driver():
    return build(KERNEL)


# ----------------------------------------------------------------------------- running

def to_dtype(x, dtype):
    """(the bytes the driver reads, the float64 values they hold): bfloat16 rounds to nearest even."""
    if dtype == "float32":
        x32 = np.ascontiguousarray(x, np.float32)
        return x32.tobytes(), x32.astype(np.float64)
    bf = torch.from_numpy(np.ascontiguousarray(x)).to(torch.bfloat16)
    return bf.view(torch.int16).numpy().tobytes(), bf.double().numpy()


def launch(exe, op, dtype, m, n, r, inputs):
    """Runs one launcher in the driver; returns its output as float64 (rows, cols), after checking
    that no guard byte changed (a write out of bounds) and no NaN is left (an element never written)."""
    header = struct.pack("5i", op, {"float32": 0, "bfloat16": 1}[dtype], m, n, r)
    p = subprocess.run([exe], input=header + b"".join(inputs), capture_output=True, timeout=300)
    assert p.returncode == 0, f"the driver failed (exit {p.returncode}) at {m}x{n}x{r}: {p.stderr.decode()[-2000:]}"
    rows, cols, guard, fill = struct.unpack("4i", p.stdout[:16])
    body = p.stdout[16:]
    before, out, after = body[:guard], body[guard:len(body) - guard], body[len(body) - guard:]
    for name, g in (("before", before), ("after", after)):
        changed = int(np.count_nonzero(np.frombuffer(g, np.uint8) != fill))
        assert changed == 0, f"out-of-bounds write at {m}x{n}x{r} {dtype}: {changed} guard bytes {name} the output changed"
    if op == 0 and dtype == "bfloat16":
        values = torch.from_numpy(np.frombuffer(out, np.int16).copy()).view(torch.bfloat16).double().numpy()
    else:
        values = np.frombuffer(out, np.float32).astype(np.float64)
    assert values.size == rows * cols, f"the driver returned {values.size} values for {rows}x{cols}"
    unwritten = int(np.isnan(values).sum())
    assert unwritten == 0, f"{unwritten} elements never written at {m}x{n}x{r} {dtype}"
    return values.reshape(rows, cols)


U32 = 2.0 ** -24  # unit roundoff of float32, the kernel's accumulator
UBF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits)
with open(KERNEL) as _f:
    _bm = re.search(r"constexpr int BM = (\d+);", _f.read())
BM = int(_bm.group(1)) if _bm else None  # rows of a block's tile: one row of partial sums per BM rows


def assert_within(found, ref, tol, what):
    err = np.abs(found - ref)
    worst = tuple(int(i) for i in np.unravel_index(np.argmax(err - tol), err.shape)) if err.size else None
    assert np.all(err <= tol), (f"{what} differs from float64: {int((err > tol).sum())} of {err.size} elements "
                                f"beyond the bound, worst at {worst}: {found[worst]} vs {ref[worst]} (bound {tol[worst]:.3g})")


def check_forward(exe, dtype, m, n, r, rng):
    """W = U diag(s) Vh against float64 on the inputs as the kernel saw them (rounded to dtype).
    Bound: each of the r terms costs two float32 roundings (U*s, then *Vh) and the r additions one
    each, so |W - ref| <= (r + 2) u32 (|U| |s| |Vh|)_ij (Higham's gamma_{r+1}). In bfloat16 the float32
    result is rounded once more, to nearest even: at most u_bf16 of it. A missing term or a wrong
    index errs by far more at these random inputs; a truncating conversion (tried by hand) fails in
    about one element in seven."""
    (bU, U), (bs, s), (bVh, Vh) = (to_dtype(x, dtype) for x in
                                   (rng.standard_normal((m, r)), rng.standard_normal(r), rng.standard_normal((r, n))))
    W = launch(exe, 0, dtype, m, n, r, [bU, bs, bVh])
    assert W.shape == (m, n)
    ref, mag = (U * s) @ Vh, (np.abs(U) * np.abs(s)) @ np.abs(Vh)
    tol = (r + 2) * U32 * mag
    if dtype == "bfloat16":
        tol = UBF16 * np.abs(ref) + (1 + UBF16) * tol
    assert_within(W, ref, tol, f"forward W at {m}x{n}x{r} {dtype}")


def check_grad_s(exe, dtype, m, n, r, rng):
    """grad_s[k] = sum_i U[i,k] (G Vh^T)[i,k] against float64, per block row of partial sums and in
    total, summed on the host as svf_recompose.cpp does: partial.sum(0) in float32.
    Bound of a partial: n roundings along j in (G Vh^T)[i,k], one for the product with U, at most BM
    additions over the block's rows; the host's sum adds one rounding per block row. bfloat16 inputs
    change nothing here: the kernel returns float32 (svf.py casts it)."""
    (bG, G), (bU, U), (bVh, Vh) = (to_dtype(x, dtype) for x in
                                   (rng.standard_normal((m, n)), rng.standard_normal((m, r)), rng.standard_normal((r, n))))
    partial = launch(exe, 1, dtype, m, n, r, [bG, bU, bVh])
    assert BM, f"no 'constexpr int BM = <rows>;' in {KERNEL}: the partial sums' block rows are unknown"
    rows = math.ceil(m / BM)
    assert partial.shape == (rows, r), f"partial sums of shape {partial.shape}, expected {(rows, r)}"
    terms, mags = U * (G @ Vh.T), np.abs(U) * (np.abs(G) @ np.abs(Vh).T)  # (m, r)
    pad = rows * BM - m  # sum the rows of each block of BM rows
    ref_p = np.pad(terms, ((0, pad), (0, 0))).reshape(rows, BM, r).sum(1)
    mag_p = np.pad(mags, ((0, pad), (0, 0))).reshape(rows, BM, r).sum(1)
    assert_within(partial, ref_p, (n + BM + 2) * U32 * mag_p, f"grad_s partial sums at {m}x{n}x{r} {dtype}")
    grad_s = torch.from_numpy(partial.astype(np.float32)).sum(0).double().numpy()  # as svf_recompose.cpp
    assert_within(grad_s, terms.sum(0), (n + BM + rows + 2) * U32 * mags.sum(0), f"grad_s at {m}x{n}x{r} {dtype}")


SHAPES = [(1, 1, 1),
          (0, 5, 3), (4, 5, 0), (4, 0, 3),        # empty m, r, n: the binding allows all three
          (65, 63, 17), (130, 257, 33),           # one past / one short of the 64x64x16 tile
          (576, 1536, 576), (1536, 576, 576),     # SmolLM2-135M's MLP, full rank
          (2051, 1543, 289)]                      # larger, every size odd


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("m,n,r", SHAPES, ids=[f"{m}x{n}x{r}" for m, n, r in SHAPES])
def test_kernel_matches_float64(driver, dtype, m, n, r):
    rng = np.random.default_rng([m, n, r])
    check_forward(driver, dtype, m, n, r, rng)
    check_grad_s(driver, dtype, m, n, r, rng)


# ----------------------------------------------------------------------------- the test of the test

# Each mutant changes one spot of the kernel's source: (text, replacement, what must catch it).
MUTANTS = {
    "store one row past the end": ("if (gi < m && gj < n) W[", "if (gi <= m && gj < n) W[", "out-of-bounds write"),
    "last column never stored": ("if (gi < m && gj < n) W[", "if (gi < m && gj < n - 1) W[", "never written"),
    "last partial k-slice skipped": ("for (int k0 = 0; k0 < r; k0 += BK)", "for (int k0 = 0; k0 + BK <= r; k0 += BK)",
                                     "forward W .* differs"),
    "barrier before the column sums removed": ("  __syncthreads();\n  // ...then across", "  // ...then across",
                                               "grad_s partial sums .* differs"),
}


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture(scope="module")
def mutants(driver):
    """The driver built with each mutated copy of the kernel, two compiles at a time."""
    source = open(KERNEL).read()
    paths = {}
    for name, (old, new, _) in MUTANTS.items():
        assert source.count(old) == 1, f"mutant {name!r}: {old!r} is not once in {KERNEL}; update MUTANTS"
        text = source.replace(old, new)
        paths[name] = os.path.join(CACHE, "mutants", f"svf_recompose-{digest(text)}.cu")
        cached(paths[name], lambda out: write(out, text))
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # the driver's object is built already
        builds = {name: pool.submit(build, path) for name, path in paths.items()}
        return {name: job.result() for name, job in builds.items()}


@pytest.mark.parametrize("name", list(MUTANTS))
def test_a_broken_kernel_fails(mutants, name):
    with pytest.raises(AssertionError, match=MUTANTS[name][2]):
        for m, n, r in [(65, 63, 17), (130, 257, 33)]:
            rng = np.random.default_rng([m, n, r])
            check_forward(mutants[name], "float32", m, n, r, rng)
            check_grad_s(mutants[name], "float32", m, n, r, rng)
