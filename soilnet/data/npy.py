"""The fixed layout of a ``.npy`` shard member, so that a batch reads its rows without ``np.load``.

Every sample of a manifest stores ``image.npy`` and ``climate.npy`` with the same dtype and shape, so a member is
a header of ``size - nbytes`` bytes followed by the raw array. The loader reads the array bytes straight into a
row of a preallocated batch array and checks the header against the ones already seen; a header not seen yet is
parsed once with numpy's own reader (``np.lib.format``) and must declare the expected dtype, shape and C order.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

import numpy as np

MAX_HEADER = 1 << 12  # numpy pads headers to 64 bytes (ours are 128); anything longer is not a header of ours


@dataclass
class NpyLayout:
    """The dtype and shape that member ``suffix`` must hold; ``headers`` caches header bytes already accepted."""

    suffix: str
    dtype: np.dtype
    shape: tuple[int, ...]
    headers: set[bytes] = field(default_factory=set)
    nbytes: int = field(init=False)

    def __post_init__(self):
        self.nbytes = math.prod(self.shape) * self.dtype.itemsize

    def header_size(self, member_size: int) -> int | None:
        """Bytes before the array data in a member of ``member_size`` bytes, or None if no header fits."""
        h = member_size - self.nbytes
        return h if 10 <= h <= MAX_HEADER else None

    def check_headers(self, headers: np.ndarray) -> list[tuple[int, str]]:
        """headers: (k, h) uint8, one header per row -> [(row, what it declares instead)] for the wrong ones.
        One comparison for the whole batch; only rows unlike an accepted header are parsed."""
        accepted = next((h for h in self.headers if len(h) == headers.shape[1]), None)
        suspects: range | list[int]
        if accepted is None:
            suspects = range(len(headers))
        else:
            suspects = np.flatnonzero((headers != np.frombuffer(accepted, dtype=np.uint8)).any(axis=1)).tolist()
        checked = ((k, self.check_header(headers[k].tobytes())) for k in suspects)
        return [(k, bad) for k, bad in checked if bad is not None]

    def check_header(self, header: bytes) -> str | None:
        """None if ``header`` declares this layout's array, else what it declares instead (for the error)."""
        header = bytes(header)
        if header in self.headers:
            return None
        f = io.BytesIO(header)
        try:
            version = np.lib.format.read_magic(f)
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(f)
        except Exception as err:  # a corrupt header fails in many ways inside numpy
            return f"unreadable .npy header ({type(err).__name__}: {err})"
        if f.tell() != len(header):
            return f"a .npy header of {f.tell()} bytes where {len(header)} precede the data"
        if dtype != self.dtype or tuple(shape) != self.shape or (fortran and len(shape) > 1):
            order = "F" if fortran else "C"
            return f"{dtype} {tuple(shape)} ({order} order), expected {self.dtype} {self.shape} (C order)"
        self.headers.add(header)
        return None
