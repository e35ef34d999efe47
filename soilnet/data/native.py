"""ctypes bindings of ``_native.c``: a chunk's reads and image conversion in one call without the GIL.

``pip install -e .`` builds the extension. Without it (no C compiler, a source tree on ``PYTHONPATH``) or with
``SOILNET_NATIVE=0``, the loader reads with ``os.preadv`` and converts with torch: the same batches, at about two
thirds of the speed with two builder threads, which then mostly wait for each other's GIL (docs/benchmarks.md).
The conversion uses the widest kernels the CPU has (AVX-512, AVX2 with F16C, else scalar);
``SOILNET_NATIVE_ISA=avx2`` or ``scalar`` caps them, as the tests do to check each against torch.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

import numpy as np
import torch

_p, _i32, _i64 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64


class Affine(ctypes.Structure):
    """``out[i, c] = raw[i, channel[c]] * scale[c] + bias[c]`` (non-finite -> 0) ``+ jitter[i, c]``, from raw
    (k, C_stored, H, W) int16 or float16 rows into (k, C, H, W) float32 or bfloat16: ``soilnet_affine`` of
    ``_native.c``. Build one with :func:`affine`; it keeps the arrays it points to alive."""

    _fields_ = [
        ("rows", _p),
        ("row_bytes", _i64),
        ("is_int16", _i32),
        ("out_bf16", _i32),
        ("channels", _i64),
        ("channel", _p),
        ("hw", _i64),
        ("scale", _p),
        ("bias", _p),
        ("jitter", _p),
        ("out", _p),
        ("max_isa", _i32),
    ]


def _load() -> ctypes.CDLL | None:
    if os.environ.get("SOILNET_NATIVE", "1") == "0":  # to compare, or to rule it out
        return None
    # the built extension's file, found without importing it: ctypes loads it (a CDLL call releases the GIL)
    spec = importlib.util.find_spec("soilnet.data._native")
    if spec is None or spec.origin is None:
        return None
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError:
        return None
    affine_p = ctypes.POINTER(Affine)
    lib.soilnet_affine_rows.argtypes, lib.soilnet_affine_rows.restype = [_i64, affine_p], None
    lib.soilnet_read_runs.argtypes = [_i64, _p, _p, _p, _p, _p, _p, _p, affine_p]
    lib.soilnet_read_runs.restype = None
    lib.soilnet_views.argtypes, lib.soilnet_views.restype = [_i64, _i64, _i64, _p, _p, _p, _p, _p, _p], None
    return lib


LIB = _load()

OUT_DTYPES = (torch.float32, torch.bfloat16)
ISAS = {"avx512": 2, "avx2": 1, "scalar": 0}
MAX_ISA = ISAS[os.environ.get("SOILNET_NATIVE_ISA", "avx512")]  # the widest kernels to use, if the CPU has them


def available() -> bool:
    return LIB is not None


def affine(raw: np.ndarray, channel, scale, bias, out: torch.Tensor, jitter: np.ndarray | None = None) -> Affine:
    """The conversion of rows ``raw`` (k, C_stored, H, W) into ``out`` (k, C, H, W); ``channel`` (C,) int64
    stored channel of each output channel, ``scale`` and ``bias`` (C,) float32, ``jitter`` (k, C) float32."""
    k, _, h, w = raw.shape
    want = (k, len(channel), h, w)
    if out.dtype not in OUT_DTYPES or not out.is_contiguous() or tuple(out.shape) != want:
        raise ValueError(f"out must be a contiguous float32 or bfloat16 tensor of {want}")
    if raw.dtype not in (np.float16, np.int16) or not raw.flags.c_contiguous:
        raise ValueError(f"raw rows must be C-contiguous float16 or int16, not {raw.dtype}")
    keep = [np.ascontiguousarray(a, dtype=t) for a, t in ((channel, np.int64), (scale, np.float32), (bias, np.float32))]
    if jitter is not None:
        keep.append(np.ascontiguousarray(jitter, dtype=np.float32).reshape(k, len(channel)))
    a = Affine(
        rows=raw.ctypes.data,
        row_bytes=raw[0].nbytes if k else 0,
        is_int16=int(raw.dtype == np.int16),
        out_bf16=int(out.dtype == torch.bfloat16),
        channels=len(channel),
        channel=keep[0].ctypes.data,
        hw=h * w,
        scale=keep[1].ctypes.data,
        bias=keep[2].ctypes.data,
        jitter=keep[3].ctypes.data if jitter is not None else None,
        out=out.data_ptr(),
        max_isa=MAX_ISA,
    )
    a._keep = (keep, raw, out)
    return a


def _lib() -> ctypes.CDLL:
    """The loaded extension; its callers run only when :func:`available`."""
    if LIB is None:
        raise RuntimeError("soilnet.data._native is not loaded (not built, or SOILNET_NATIVE=0)")
    return LIB


def affine_rows(a: Affine, k: int) -> None:
    _lib().soilnet_affine_rows(k, ctypes.byref(a))


def read_runs(runs: np.ndarray, iov: np.ndarray, got: np.ndarray, convert: Affine | None) -> None:
    """The ``preadv`` calls ``runs`` (n, 5) int64: fd, file offset, first buffer, buffer count, row; ``iov``
    (m, 2) int64 buffer addresses and lengths; ``got`` (n,) int64 receives bytes read or -errno. With
    ``convert``, each fully read row is converted right after its reads."""
    fd = np.ascontiguousarray(runs[:, 0], dtype=np.int32)
    count = np.ascontiguousarray(runs[:, 3], dtype=np.int32)
    offset, first, row = (np.ascontiguousarray(runs[:, j]) for j in (1, 2, 4))
    iov = np.ascontiguousarray(iov, dtype=np.int64)
    _lib().soilnet_read_runs(
        *(len(runs), fd.ctypes.data, offset.ctypes.data, first.ctypes.data, count.ctypes.data, row.ctypes.data),
        *(iov.ctypes.data, got.ctypes.data, None if convert is None else ctypes.byref(convert)),
    )


def views(
    src: torch.Tensor,
    out: torch.Tensor,
    row: torch.Tensor,
    col: torch.Tensor,
    transpose: torch.Tensor,
    jitter: torch.Tensor | None,
) -> None:
    """``out[b, c, i, j] = src[b, c, row[b, i], col[b, j]] + jitter[b, c]`` (``row[b, j], col[b, i]`` where
    ``transpose[b]``): src and out (B, C, n, n) float32 contiguous CPU tensors, row and col (B, n) int32, transpose
    (B,) bool, jitter (B, C) float32 or None; ``soilnet_views`` of ``_native.c``."""
    b, c, n, _ = src.shape
    for t, dtype, shape in (
        (src, torch.float32, (b, c, n, n)),
        (out, torch.float32, (b, c, n, n)),
        (row, torch.int32, (b, n)),
        (col, torch.int32, (b, n)),
        (transpose, torch.bool, (b,)),
    ):
        if t.dtype != dtype or not t.is_contiguous() or t.device.type != "cpu" or tuple(t.shape) != shape:
            got = f"{t.dtype} {tuple(t.shape)} on {t.device}"
            raise ValueError(f"views: expected a contiguous {dtype} CPU tensor of {shape}, got {got}")
    if jitter is not None:
        jitter = jitter.to(torch.float32).contiguous()
    _lib().soilnet_views(
        b,
        c,
        n,
        src.data_ptr(),
        out.data_ptr(),
        row.data_ptr(),
        col.data_ptr(),
        transpose.data_ptr(),
        None if jitter is None else jitter.data_ptr(),
    )
