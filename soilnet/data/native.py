"""ctypes bindings of ``_native.c``: a chunk's reads and image conversion in one call without the GIL.

``pip install -e .`` builds the extension. Without it (no C compiler, a source tree on ``PYTHONPATH``) the
loader reads with ``os.preadv`` and converts with torch: the same batches, at about two thirds of the speed with
two builder threads, which then mostly wait for each other's GIL (see docs/benchmarks.md).
"""

from __future__ import annotations

import ctypes
import os

import numpy as np
import torch


def _load() -> ctypes.CDLL | None:
    if os.environ.get("SOILNET_NATIVE", "1") == "0":  # to compare or to rule it out
        return None
    try:
        from soilnet.data import _native
    except ImportError:
        return None
    lib = ctypes.CDLL(_native.__file__)  # a CDLL call releases the GIL
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    affine = [i64, p, i64, i32, i64, p, i64, p, p, p, p]
    lib.soilnet_affine_rows.argtypes, lib.soilnet_affine_rows.restype = affine, None
    lib.soilnet_read_runs.argtypes = [i64, p, p, p, p, p, p, p, *affine[1:9], p]
    lib.soilnet_read_runs.restype = None
    return lib


LIB = _load()


def available() -> bool:
    return LIB is not None


class Affine:
    """``out[i, c] = raw[i, channel[c]] * scale[c] + bias[c]`` (non-finite -> 0) from raw (k, C_stored, H, W)
    int16 or float16 rows into (k, C, H, W) float32."""

    def __init__(self, channel: np.ndarray, scale: np.ndarray, bias: np.ndarray, dtype: np.dtype):
        if np.dtype(dtype) not in (np.dtype(np.float16), np.dtype(np.int16)):
            raise ValueError(f"no native decoding of {dtype} images")
        self.channel = np.ascontiguousarray(channel, dtype=np.int64)
        self.scale = np.ascontiguousarray(scale, dtype=np.float32)
        self.bias = np.ascontiguousarray(bias, dtype=np.float32)
        self.is_int16 = int(np.dtype(dtype) == np.int16)

    def args(self, raw: np.ndarray, out: torch.Tensor) -> tuple:
        """The conversion's arguments of ``_native.c`` for rows ``raw`` into ``out``."""
        k, _, h, w = raw.shape
        if out.dtype != torch.float32 or not out.is_contiguous() or tuple(out.shape) != (k, len(self.channel), h, w):
            raise ValueError(f"out must be a contiguous float32 tensor of {(k, len(self.channel), h, w)}")
        if not raw.flags.c_contiguous:
            raise ValueError("raw rows must be C-contiguous")
        return (raw.ctypes.data, raw[0].nbytes if k else 0, self.is_int16, len(self.channel),
                self.channel.ctypes.data, h * w, self.scale.ctypes.data, self.bias.ctypes.data)  # fmt: skip

    def __call__(self, raw: np.ndarray, out: torch.Tensor) -> None:
        LIB.soilnet_affine_rows(len(raw), *self.args(raw, out), None, out.data_ptr())


def read_runs(runs: np.ndarray, iov: np.ndarray, got: np.ndarray, convert: tuple | None, out: torch.Tensor | None):
    """The ``preadv`` calls ``runs`` (n, 5) int64: fd, file offset, first buffer, buffer count, row; ``iov``
    (m, 2) int64 buffer addresses and lengths; ``got`` (n,) int64 receives bytes read or -errno. With ``out``,
    each fully read row is converted by ``convert`` (:meth:`Affine.args`) right after its reads."""
    runs = np.ascontiguousarray(runs)
    fd = np.ascontiguousarray(runs[:, 0], dtype=np.int32)
    count = np.ascontiguousarray(runs[:, 3], dtype=np.int32)
    offset, first, row = (np.ascontiguousarray(runs[:, j]) for j in (1, 2, 4))
    conv = convert if out is not None else (None, 0, 0, 0, None, 0, None, None)
    LIB.soilnet_read_runs(
        len(runs), fd.ctypes.data, offset.ctypes.data, first.ctypes.data, count.ctypes.data, row.ctypes.data,
        iov.ctypes.data, got.ctypes.data, *conv, None if out is None else out.data_ptr(),
    )  # fmt: skip
