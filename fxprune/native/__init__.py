"""Fused CPU kernels for the two passes of compile that read every weight: the importance's per-channel
magnitude sums and the rewrite's slicing of tensors cut on two dims (kernels.c). Each is one read of the
weight where torch's ops need two or three.

The library is built on first use with the system's C compiler (`$CC`, else `cc`; well under a second)
into fxprune's cache folder (fxprune/cache.py) and loaded with ctypes: no Python package and no torch
headers are involved. A new build is cached only once it has passed its self-test in a child process
(abi.py). Where it cannot be built (no compiler, another platform) or is turned off (FXPRUNE_NATIVE=0),
every caller uses torch's ops instead. Results are the same: slices exactly, magnitude sums to float
rounding (the additions come in another order). The output model never uses these kernels."""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..cache import cache_dir
from .abi import BFLOAT16, FLOAT16, FLOAT32, FLOAT64, CutJob, SumJob, declare

log = logging.getLogger("fxprune")

ENV = "FXPRUNE_NATIVE"                      # "0" turns the kernels off
SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels.c")
SELF_TEST = os.path.join(os.path.dirname(os.path.abspath(__file__)), "abi.py")
FLAGS = ["-O3", "-fPIC", "-shared", "-fopenmp-simd"]
TUNED_FLAGS = ["-march=native"]            # dropped where the compiler does not take it
# rows per work block: about this many elements, so blocks depend on the shape only (not the threads), and
# at most MAX_SUM_BLOCKS blocks per summed tensor, each of which keeps a row of column sums (an LLM's
# embedding would otherwise keep a sixteenth of its size)
BLOCK_ELEMENTS = 1 << 16
MAX_SUM_BLOCKS = 256
_SUM_DTYPES = {torch.float32: FLOAT32, torch.float64: FLOAT64, torch.bfloat16: BFLOAT16, torch.float16: FLOAT16}


_library: Dict[str, Optional[ctypes.CDLL]] = {}   # one load attempt per process (key: the library path)


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, built first if the cache has none; None where they are off or cannot be built
    (logged once, at info level, with the reason)."""
    if not enabled():
        return None
    path = _library_path()
    if path not in _library:
        _library[path] = _load(path)
    return _library[path]


def summed_view(tensor: torch.Tensor, dims: Sequence[int],
                power: int) -> Optional[Tuple[int, int, int, bool, bool]]:
    """(n, k, inner, row sums?, column sums?): the [n, k, inner] view of `tensor` under which `dims` are its
    rows (dim 0) and/or columns (dim 1), and which of the two are wanted; None where the kernels do not
    apply (see MagnitudeSums.add)."""
    if not _plain_memory(tensor) or tensor.dtype not in _SUM_DTYPES or power not in (1, 2):
        return None
    shape, dims = tuple(tensor.shape), sorted(dims)
    if dims == [0, 1]:
        return shape[0], shape[1], _prod(shape[2:]), True, True
    if dims == [0]:
        return shape[0], _prod(shape[1:]), 1, True, False
    if len(dims) == 1:   # a lone dim d > 0: the columns of [before d, d, after d]
        d = dims[0]
        return _prod(shape[:d]), shape[d], _prod(shape[d + 1:]), False, True
    return None


class MagnitudeSums:
    """Per tensor and channel dim, the sums of |x|**power over every other dim, for many tensors in one
    call: `add` the tensors (False where the kernels do not apply or are unavailable), then `run` returns,
    per added tensor, {dim: float64 tensor of per-position sums}, or None if the call failed."""

    def __init__(self, power: int):
        self.power, self.lib = power, library()
        self.jobs: List[SumJob] = []
        self.outputs: List[Dict[int, np.ndarray]] = []
        self.keep_alive: List[object] = []

    def add(self, tensor: torch.Tensor, dims: Sequence[int]) -> bool:
        view = summed_view(tensor, dims, self.power) if self.lib is not None else None
        if view is None:
            return False
        n, k, inner, sums_rows, sums_cols = view
        block_rows = max(1, BLOCK_ELEMENTS // max(k * inner, 1), -(-n // MAX_SUM_BLOCKS))
        rows = np.empty(n) if sums_rows else None
        cols = np.empty(k) if sums_cols else None
        # per-block column sums in the type the kernel adds in: double for float64 weights, else float
        partial = np.empty((-(-n // block_rows), k), dtype=np.float64 if tensor.dtype == torch.float64 else np.float32) \
            if sums_cols else None
        self.jobs.append(SumJob(tensor.data_ptr(), n, k, inner, _SUM_DTYPES[tensor.dtype], self.power,
                                 _pointer(rows), _pointer(cols), _pointer(partial), block_rows))
        self.outputs.append({d: (rows if d == 0 and sums_rows else cols) for d in dims})
        self.keep_alive += [tensor, partial]
        return True

    def run(self) -> Optional[List[Dict[int, torch.Tensor]]]:
        if self.jobs:
            jobs = (SumJob * len(self.jobs))(*self.jobs)
            if self.lib.fxprune_magnitude_sums(jobs, len(self.jobs), torch.get_num_threads()) != 0:
                return None
        return [{d: torch.from_numpy(v) for d, v in out.items()} for out in self.outputs]


class Cuts:
    """Tensors cut on dims 0 and 1 (or on dim 1 alone), many in one call: `add` returns the new tensor
    (its contents written by `run`), or None where the kernels do not apply or are unavailable; `run`
    returns False if the call failed (the added tensors are then unwritten)."""

    def __init__(self):
        self.lib = library()
        self.jobs: List[CutJob] = []
        self.keep_alive: List[object] = []

    def add(self, tensor: torch.Tensor, rows: Optional[torch.Tensor], cols: torch.Tensor) -> Optional[torch.Tensor]:
        if self.lib is None or not _plain_memory(tensor) or tensor.ndim < 2:
            return None
        rows = None if rows is None else _indices(rows, tensor.shape[0])
        cols = _indices(cols, tensor.shape[1])
        if rows is False or cols is False:
            return None
        n_rows = tensor.shape[0] if rows is None else len(rows)
        out = torch.empty((n_rows, len(cols)) + tuple(tensor.shape[2:]), dtype=tensor.dtype)
        inner = _prod(tensor.shape[2:])
        block_rows = max(1, BLOCK_ELEMENTS // max(len(cols) * inner, 1))
        self.jobs.append(CutJob(tensor.data_ptr(), out.data_ptr(), tensor.shape[1], inner, tensor.element_size(),
                                 _pointer(rows), n_rows, _pointer(cols), len(cols), block_rows))
        self.keep_alive += [tensor, out, rows, cols]
        return out

    def run(self) -> bool:
        if not self.jobs:
            return True
        jobs = (CutJob * len(self.jobs))(*self.jobs)
        return self.lib.fxprune_cut(jobs, len(self.jobs), torch.get_num_threads()) == 0


def _plain_memory(tensor: torch.Tensor) -> bool:
    """Whether the tensor's values are its memory as laid out: a dense, contiguous CPU tensor of a plain
    Tensor or Parameter class, with no quantisation and no lazy conjugate or negative bit."""
    return (type(tensor) in (torch.Tensor, torch.nn.Parameter) and tensor.device.type == "cpu"
            and tensor.layout == torch.strided and not tensor.is_quantized and not tensor.is_conj()
            and not tensor.is_neg() and tensor.is_contiguous() and tensor.numel() > 0)


def _indices(index: torch.Tensor, size: int):
    """index as a contiguous int64 numpy array, or False if any entry is out of [0, size) (the kernel
    trusts its indices)."""
    array = np.ascontiguousarray(index.cpu().numpy(), dtype=np.int64)
    if len(array) and (array.min() < 0 or array.max() >= size):
        return False
    return array


def _pointer(array: Optional[np.ndarray]) -> Optional[int]:
    return None if array is None else array.ctypes.data


def _prod(values) -> int:
    out = 1
    for v in values:
        out *= int(v)
    return out


# ----------------------------------------------------------------------------------------- building
def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CC") or "cc")


def _library_path() -> str:
    suffix = ".dylib" if sys.platform == "darwin" else ".so"
    return cache_dir("native", f"kernels-{_build_key(_compiler())}{suffix}")


@functools.lru_cache(maxsize=None)
def _build_key(compiler: Optional[str]) -> str:
    """What the build depends on: the source, the flags, the compiler and the CPU (-march=native code must
    not reach another CPU through a shared home folder). Once per process: every compile asks."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read())
    digest.update(" ".join(FLAGS + TUNED_FLAGS + [str(compiler), platform.machine(), _cpu_flags()]).encode())
    return digest.hexdigest()[:16]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _load(path: str) -> Optional[ctypes.CDLL]:
    try:
        if not os.path.exists(path):
            _build(path)
        return declare(ctypes.CDLL(path))
    except Exception as exc:  # no compiler, a failed build, a library that does not load: torch's ops serve
        log.info("native kernels unavailable (%s); using torch's ops (compile is slower)", exc)
        return None


def _build(path: str) -> None:
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError(f"no C compiler ({os.environ.get('CC') or 'cc'} is not on PATH)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # built under a temporary name, then renamed: processes building at once never load a partial file
    fd, partial = tempfile.mkstemp(suffix=".so", dir=os.path.dirname(path))
    os.close(fd)
    try:
        for flags in (FLAGS + TUNED_FLAGS, FLAGS):
            result = subprocess.run([compiler, *flags, "-o", partial, SOURCE, "-lpthread", "-lm"],
                                    capture_output=True, text=True)
            if result.returncode == 0:
                break
        else:
            raise RuntimeError(f"{compiler} failed: {(result.stderr.strip().splitlines() or ['?'])[-1]}")
        # checked in a child process before anything loads it here: a library that computes wrongly, or
        # crashes (code for another CPU), is never cached
        check = subprocess.run([sys.executable, SELF_TEST, partial], capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"the built library failed its self-test "
                               f"({(check.stderr.strip().splitlines() or ['exit status %d' % check.returncode])[-1]})")
        os.replace(partial, path)
        log.info("built native kernels into %s", path)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
