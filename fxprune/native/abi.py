"""The kernels' C interface (kernels.c) as ctypes types, and the self-test a freshly built library passes
before it is used. Imports ctypes and numpy only: the self-test runs as a script in a child process, so a
library that crashes (code for the wrong CPU) takes down the child, never the caller.

    python fxprune/native/abi.py path/to/kernels.so     # exit status 0: the library computes what it should"""
from __future__ import annotations

import ctypes
import sys

import numpy as np

FLOAT32, FLOAT64, BFLOAT16, FLOAT16 = 0, 1, 2, 3


class SumJob(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("n", ctypes.c_int64), ("k", ctypes.c_int64), ("inner", ctypes.c_int64),
                ("dtype", ctypes.c_int32), ("power", ctypes.c_int32), ("rows", ctypes.c_void_p),
                ("cols", ctypes.c_void_p), ("partial", ctypes.c_void_p), ("block_rows", ctypes.c_int64)]


class CutJob(ctypes.Structure):
    _fields_ = [("src", ctypes.c_void_p), ("dst", ctypes.c_void_p), ("k", ctypes.c_int64),
                ("inner", ctypes.c_int64), ("elem", ctypes.c_int64), ("rows", ctypes.c_void_p),
                ("n_rows", ctypes.c_int64), ("cols", ctypes.c_void_p), ("n_cols", ctypes.c_int64),
                ("block_rows", ctypes.c_int64)]


def declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    """The library with its entry points' argument and result types set."""
    for name, job in (("fxprune_magnitude_sums", SumJob), ("fxprune_cut", CutJob)):
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = [ctypes.POINTER(job), ctypes.c_int64, ctypes.c_int], ctypes.c_int
    return lib


def self_test(lib: ctypes.CDLL) -> None:
    """Both kernels on small arrays of every kind they take, on two threads, against numpy; raises
    AssertionError on a wrong result."""
    rng = np.random.default_rng(0)
    for code in (FLOAT32, FLOAT64, BFLOAT16, FLOAT16):
        for power in (1, 2):
            for n, k, inner, block_rows in ((7, 5, 1, 2), (6, 4, 9, 4)):
                values, w = _weights(rng, (n, k, inner), code)
                rows, cols = np.empty(n), np.empty(k)
                partial = np.empty((-(-n // block_rows), k), dtype=np.float64 if code == FLOAT64 else np.float32)
                job = SumJob(w.ctypes.data, n, k, inner, code, power, rows.ctypes.data, cols.ctypes.data,
                             partial.ctypes.data, block_rows)
                assert lib.fxprune_magnitude_sums((SumJob * 1)(job), 1, 2) == 0
                magnitude = np.abs(values) ** power
                assert np.allclose(rows, magnitude.sum((1, 2)), rtol=1e-5), "row sums"
                assert np.allclose(cols, magnitude.sum((0, 2)), rtol=1e-5), "column sums"
    # every 16-bit pattern, as float16 and as bfloat16: |x| of each must come back exactly (NaN as NaN)
    every = np.arange(1 << 16, dtype=np.uint32)
    with np.errstate(invalid="ignore"):      # signalling NaNs among them
        patterns = ((FLOAT16, every.astype(np.uint16).view(np.float16).astype(np.float64)),
                    (BFLOAT16, (every << 16).view(np.float32).astype(np.float64)))
    for code, values in patterns:
        bits, rows = every.astype(np.uint16), np.empty(1 << 16)
        job = SumJob(bits.ctypes.data, 1 << 16, 1, 1, code, 1, rows.ctypes.data, None, None, 4096)
        assert lib.fxprune_magnitude_sums((SumJob * 1)(job), 1, 2) == 0
        assert np.array_equal(rows, np.abs(values), equal_nan=True), "16-bit conversion"
    for dtype in (np.float32, np.float64, np.float16, np.uint8):
        for inner in (1, 3):
            src = (rng.standard_normal((6, 7, inner)) * 50).astype(dtype)
            rows, cols = np.array([0, 2, 5], dtype=np.int64), np.array([6, 1, 3], dtype=np.int64)
            dst = np.zeros((3, 3, inner), dtype=dtype)
            job = CutJob(src.ctypes.data, dst.ctypes.data, 7, inner, src.itemsize, rows.ctypes.data, 3,
                         cols.ctypes.data, 3, 2)
            assert lib.fxprune_cut((CutJob * 1)(job), 1, 2) == 0
            assert np.array_equal(dst, src[rows][:, cols]), "cut"


def _weights(rng, shape, code):
    """(float64 values, the array the kernel reads) for a dtype code: bfloat16, which numpy lacks, as the
    upper halves of float32 values; float16 with a subnormal among its values."""
    values = rng.standard_normal(shape)
    if code == BFLOAT16:
        bits = (values.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64), bits
    dtype = {FLOAT32: np.float32, FLOAT64: np.float64, FLOAT16: np.float16}[code]
    if code == FLOAT16:
        values.flat[0] = 3e-6                               # a float16 subnormal
    w = values.astype(dtype)
    return w.astype(np.float64), w


if __name__ == "__main__":
    self_test(declare(ctypes.CDLL(sys.argv[1])))
