"""Progress of a long stage (``pack``, ``import-soilnet``, ``pretrain``, ``finetune``, ``evaluate``,
``predict-map``), where its user looks: a bar on a terminal, lines in a batch log.

When the stream (stderr) is not a terminal, :class:`Progress` writes a line when it starts, one every
``SOILNET_PROGRESS_S`` seconds (30 by default; 0: at every update) and a final one::

    pack[0/1]: 1200/5000 samples (24%), 40.1 samples/s, ETA 0:01:35
    pack[0/1]: finished 5000/5000 samples (100%) in 0:02:04, 40.3 samples/s

On a terminal it draws a ``tqdm`` bar instead. Where several processes run a stage, the caller passes
``enabled=False`` on all but one (rank 0), so one log holds one report. The clock and the stream are arguments,
so tests need no sleeping.

:class:`Scalars` is how TensorBoard's ``SummaryWriter`` looks to the training loops, which never open it
themselves: the jobs do (``train.tensorboard``).
"""

from __future__ import annotations

import functools
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol, TextIO

from tqdm import tqdm

ENV = "SOILNET_PROGRESS_S"
DEFAULT_S = 30.0


class Scalars(Protocol):
    """TensorBoard's ``SummaryWriter``, as the training loops use it."""

    def add_scalar(self, tag: str, scalar_value: float, global_step: int) -> Any: ...

    def close(self) -> Any: ...


@functools.cache
def _parse_interval(raw: str | None) -> float:
    if raw is None or not raw.strip():
        return DEFAULT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{ENV}={raw!r}: expected seconds between progress lines, a number >= 0 ({DEFAULT_S:g} by default)"
        )
    return value


def interval_s(environ: Mapping[str, str] | None = None) -> float:
    """Seconds between progress lines in a log: ``SOILNET_PROGRESS_S`` (parsed once per value), 30 by default.
    A value that is not a number >= 0 is a ``ValueError`` naming the variable."""
    return _parse_interval((os.environ if environ is None else environ).get(ENV))


def duration(seconds: float) -> str:
    """``H:MM:SS`` (``?`` when unknown)."""
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def plural(unit: str) -> str:
    """``sample`` -> ``samples``, ``batch`` -> ``batches``."""
    if unit.endswith("s"):
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "x")) else "s")


def rate_text(rate: float) -> str:
    return f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"


class Progress:
    """``done`` of ``total`` ``unit``\\ s of a stage; ``update(n)`` after each piece of work, ``close()`` at the end
    (or use it as a context manager). Also the bar interface of the pretraining loop (``set_postfix``)."""

    def __init__(
        self,
        stage: str,
        total: int | None,
        unit: str,
        *,
        initial: int = 0,
        enabled: bool = True,
        stream: TextIO | None = None,
        interval: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        tty: bool | None = None,
    ):
        self.stage, self.total, self.unit = stage, total, unit
        self.done = self.initial = initial
        self.stream = sys.stderr if stream is None else stream
        self.clock = clock
        self.postfix: dict[str, Any] = {}
        self.closed = not enabled
        self.bar: tqdm | None = None
        self.interval = interval_s() if interval is None else interval
        self.start = self.last = clock()
        if not enabled:
            return
        if self.stream.isatty() if tty is None else tty:
            self.bar = tqdm(total=total, initial=initial, desc=stage, unit=unit, file=self.stream, dynamic_ncols=True)
        else:
            self._write(f"{stage}: {self._count()}, started")

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close(stopped=exc_type is not None)

    def _count(self) -> str:
        if self.total is None:
            return f"{self.done} {plural(self.unit)}"
        pct = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        return f"{self.done}/{self.total} {plural(self.unit)}{pct}"

    def rate(self) -> float:
        """Units per second since the start (work done before, ``initial``, not counted)."""
        return (self.done - self.initial) / max(self.clock() - self.start, 1e-9)

    def eta(self) -> str:
        rate = self.rate()
        if self.total is None or rate <= 0:
            return "?"
        return duration(max(self.total - self.done, 0) / rate)

    def _extra(self) -> str:
        return "".join(f", {k} {v}" for k, v in self.postfix.items())

    def line(self) -> str:
        """The periodic line: stage, done / total, rate, ETA and the postfix."""
        units = plural(self.unit)
        return f"{self.stage}: {self._count()}, {rate_text(self.rate())} {units}/s, ETA {self.eta()}{self._extra()}"

    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def update(self, n: int = 1) -> None:
        if self.closed:
            return
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        now = self.clock()
        if now - self.last >= self.interval:
            self.last = now
            self._write(self.line())

    def set_postfix(self, **kwargs: Any) -> None:
        """Values shown after the count (on the bar, or at the end of the next line), e.g. the loss."""
        self.postfix.update(kwargs)
        if self.bar is not None and not self.closed:
            self.bar.set_postfix(**self.postfix)

    def close(self, stopped: bool = False) -> None:
        """The final line, ``finished`` (``stopped`` when an error or a signal ended the stage), or close the bar;
        once."""
        if self.closed:
            return
        self.closed = True
        if self.bar is not None:
            self.bar.close()
            return
        word = "stopped at" if stopped else "finished"
        elapsed = duration(self.clock() - self.start)
        self._write(
            f"{self.stage}: {word} {self._count()} in {elapsed}, {rate_text(self.rate())} {plural(self.unit)}/s"
            f"{self._extra()}"
        )
