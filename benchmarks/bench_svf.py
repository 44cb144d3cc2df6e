"""Speed and memory of svf.py on the default checkpoint: SVD, cache, recomposition, the CUDA kernel.

    python -m benchmarks.bench_svf [--model DIR] [--runs 3] [--gpu-runs 20]

Every number is the median of --runs runs. Peak memory is the resident set size (RSS) sampled every
few milliseconds during a phase, above what the process held before it. On a GPU, the kernel is
timed against `(U * s) @ Vh` (a scaled copy of U, then cuBLAS) and against a plain matmul of the
same size (cuBLAS alone: the floor for any W = U diag(s) Vh), forward and backward.
"""

import argparse
import os
import statistics
import tempfile
import threading
import time

import torch

import svd_cache
import svf
from model import load_model


def median_time(fn, runs, sync=lambda: None):
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """with PeakRSS() as peak: ... ; peak.bytes = highest RSS seen inside, minus RSS on entry."""

    def __enter__(self):
        self.start, self.peak, self.done = rss_bytes(), rss_bytes(), False
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while not self.done:
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.done = True
        self.thread.join()
        self.peak = max(self.peak, rss_bytes())
        self.bytes = self.peak - self.start


def bench_cpu(model, identity, runs):
    for targets in ("all", "mlp"):
        names = svf.target_names(model, targets)
        weights = [model.get_parameter(n) for n in names]
        peaks = []

        def run():
            with PeakRSS() as peak:
                factors = [svd_cache.decompose(W) for W in weights]
                del factors
            peaks.append(peak.bytes)
        t = median_time(run, runs)
        print(f"SVD, {targets:3}: {len(names):3} matrices  {t:6.2f} s   peak RSS +{statistics.median(peaks) / 2**20:.0f} MiB")

    for targets in ("mlp", "all"):
        svf.SVF(model, identity, targets, log=lambda s: None)  # builds the cache once (no timing)
        weights = {n: model.get_parameter(n) for n in svf.target_names(model, targets)}
        t_open = median_time(lambda: svd_cache.load_or_decompose(weights, identity, targets, log=print), runs)

        def read_all():  # the cache is memory-mapped: make the pages resident to time a full read
            for U, sigma, Vh in svd_cache.load_or_decompose(weights, identity, targets, log=print).values():
                U.sum(), sigma.sum(), Vh.sum()
        t_read = median_time(read_all, runs)
        path = svd_cache.cache_path(identity, targets)
        print(f"cached SVD, {targets:3}: open + spot check {t_open * 1e3:6.1f} ms, "
              f"open + read all {t_read * 1e3:6.1f} ms  ({os.path.getsize(path) / 2**20:.0f} MiB file)")

    for targets in ("mlp", "all"):
        s = svf.SVF(model, identity, targets, impl="torch", log=print)
        grads = {n: torch.randn_like(model.get_parameter(n)) for n in s.names}

        def fwd():
            with torch.no_grad():
                s.weights()

        def fwd_bwd():
            W = s.weights()
            sum((W[n] * grads[n]).sum() for n in s.names).backward()
        print(f"recompose {len(s.names):3} matrices ({targets:3}), CPU reference: forward "
              f"{median_time(fwd, runs):5.2f} s, forward+backward {median_time(fwd_bwd, runs):5.2f} s")


def bench_gpu(runs):
    dev = torch.device("cuda")
    sync = torch.cuda.synchronize
    kernel = svf.load_kernel()
    shapes = [("SmolLM2 gate/up", 1536, 576, 576), ("SmolLM2 down", 576, 576, 1536),
              ("Llama-3-8B q/o", 4096, 4096, 4096), ("Llama-3-8B gate/up", 14336, 4096, 4096),
              ("Llama-3-8B down", 4096, 4096, 14336)]
    print(f"GPU: {torch.cuda.get_device_name()}; times in ms, TFLOP/s counts 2*m*r*n")
    for dtype in (torch.float32, torch.bfloat16):
        print(f"{str(dtype):15} {'matrix (m, r, n)':20} {'kernel':>8} {'(U*s)@Vh':>9} {'matmul':>8} | "
              f"{'backward':9} {'kernel':>8} {'torch':>8}   kernel TFLOP/s")
        for label, m, r, n in shapes:
            U, s, Vh = (torch.randn(m, r, device=dev, dtype=dtype), torch.rand(r, device=dev, dtype=dtype),
                        torch.randn(r, n, device=dev, dtype=dtype))
            G = torch.randn(m, n, device=dev, dtype=dtype)
            t = {"kernel": lambda: kernel.recompose(U, s, Vh), "scaled": lambda: (U * s) @ Vh,
                 "matmul": lambda: U @ Vh, "bwd kernel": lambda: kernel.grad_s(G, U, Vh),
                 "bwd torch": lambda: ((G @ Vh.mT) * U).sum(0)}
            for fn in t.values():  # warm-up (and the first-use costs of cuBLAS)
                fn()
            ms = {k: median_time(fn, runs, sync) * 1e3 for k, fn in t.items()}
            print(f"{'':15} {label:20} {ms['kernel']:8.3f} {ms['scaled']:9.3f} {ms['matmul']:8.3f} | "
                  f"{'':9} {ms['bwd kernel']:8.3f} {ms['bwd torch']:8.3f}   {2 * m * r * n / ms['kernel'] / 1e9:.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the default model)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--gpu-runs", type=int, default=20)
    ap.add_argument("--cache-dir", default=None, help="where to put the SVD cache (default: a temporary folder)")
    args = ap.parse_args()
    import checkpoints
    model_dir = args.model or checkpoints.default_model_dir()
    model, _ = load_model(model_dir)
    identity = svf.checkpoint_identity(model_dir)
    # The load average says whether other processes compete for the cores: MKL's threads spin while
    # they wait for each other, so an SVD on an oversubscribed machine can take 30x longer (setting
    # OMP_WAIT_POLICY=PASSIVE or fewer threads avoids that).
    print(f"{identity}, torch {torch.__version__}, {torch.get_num_threads()} CPU threads, "
          f"load average {os.getloadavg()[0]:.1f}, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["T2_CACHE_DIR"] = args.cache_dir or tmp  # a cold cache, and no trace left behind
        bench_cpu(model, identity, args.runs)
    if torch.cuda.is_available():
        bench_gpu(args.gpu_runs)
    else:
        print("GPU: none visible; kernel timings skipped")


if __name__ == "__main__":
    main()
