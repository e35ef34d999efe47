"""HTTP transport shared by the STAC source's readers: GDAL's settings, a per-host limit, retries, redaction, the
threads' computing turn and the caches they share.

Reads of cloud-optimized files go through GDAL's ``/vsicurl/`` (HTTP range requests); the settings below suit many
small windowed reads of few large files from many threads (docs/shards.md, "STAC"):

- ``GDAL_DISABLE_READDIR_ON_OPEN=EMPTY_DIR``: no directory listing before opening a file (object stores list
  slowly, and a signed URL cannot be listed at all);
- ``CPL_VSIL_CURL_ALLOWED_EXTENSIONS``: only ``.tif``/``.tiff`` names are probed, never sidecar files;
- ``GDAL_HTTP_MULTIPLEX=YES`` and ``GDAL_HTTP_VERSION=2``: one HTTP/2 connection per host carries the parallel
  range requests where the server speaks HTTP/2 (HTTP/1.1 otherwise);
- ``GDAL_HTTP_MERGE_CONSECUTIVE_RANGES=YES``: adjacent tiles of one window in one request;
- ``GDAL_HTTP_MULTIRANGE=SERIAL``: the other ranges of one read one after another, so that a read holding one slot
  of the per-host limit (:class:`HostLimit`) is one request in flight; the threads give the parallelism;
- ``GDAL_INGESTED_BYTES_AT_OPEN=32768``: a COG's header and tile index in the first request;
- ``VSI_CACHE=TRUE`` (per open file) and ``CPL_VSIL_CURL_CACHE_SIZE`` (process-wide): headers, overviews and
  tiles already fetched are served from memory to the next points of the same scene;
- ``GDAL_HTTP_MAX_RETRY``/``GDAL_HTTP_RETRY_DELAY``/``GDAL_HTTP_RETRY_CODES``: GDAL itself retries 429 and 5xx,
  its delay doubling on each attempt; ``GDAL_HTTP_TIMEOUT``.

A value already in the environment wins over these defaults; ``source.stac.gdal`` wins over both.
"""

from __future__ import annotations

import functools
import importlib
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator, Sequence
from concurrent.futures import Executor, Future
from contextlib import contextmanager
from typing import Any, TypeVar
from urllib.parse import urlsplit

from soilnet.config.base import ConfigError

T = TypeVar("T")
RETRY_CODES = (429, 500, 502, 503, 504)
_TRANSIENT = re.compile(r"\b(429|500|502|503|504)\b|[Tt]imed? ?out|[Cc]onnection (reset|refused|aborted)")
_QUERY = re.compile(r"(\w+://[^\s?'\"]*)\?[^\s'\")]*")
_USERINFO = re.compile(r"(\w+://)[^/\s@'\"]+@")


def gdal_options(max_retries: int, retry_delay_s: float, timeout_s: float) -> dict[str, str]:
    """The GDAL config options for many windowed HTTP reads (module docstring)."""
    return {
        "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
        "CPL_VSIL_CURL_ALLOWED_EXTENSIONS": ".tif,.TIF,.tiff,.TIFF",
        "GDAL_HTTP_MULTIPLEX": "YES",
        "GDAL_HTTP_VERSION": "2",
        "GDAL_HTTP_MERGE_CONSECUTIVE_RANGES": "YES",
        "GDAL_HTTP_MULTIRANGE": "SERIAL",
        "GDAL_INGESTED_BYTES_AT_OPEN": "32768",
        "VSI_CACHE": "TRUE",
        "VSI_CACHE_SIZE": str(16 << 20),
        "CPL_VSIL_CURL_CACHE_SIZE": str(256 << 20),
        "GDAL_HTTP_MAX_RETRY": str(max_retries),
        "GDAL_HTTP_RETRY_DELAY": f"{retry_delay_s:g}",
        "GDAL_HTTP_RETRY_CODES": ",".join(map(str, RETRY_CODES)),
        "GDAL_HTTP_TIMEOUT": str(max(1, round(timeout_s))),
    }


def configure_gdal(defaults: dict[str, str], overrides: dict[str, str]) -> dict[str, str]:
    """Put ``defaults`` into the environment where unset and ``overrides`` always; returns what is in effect."""
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.environ.update(overrides)
    return {key: os.environ[key] for key in {**defaults, **overrides}}


@functools.lru_cache(maxsize=4096)  # a sample's lineage redacts the same dozen hrefs as its neighbours'
def redact(text: str) -> str:
    """``text`` with every URL's query string and user:password removed (signed-URL tokens, API keys)."""
    return _QUERY.sub(r"\1?<redacted>", _USERINFO.sub(r"\1", text))


def load_hook(dotted: str | None) -> Callable[[str], str]:
    """The URL-signing callable at ``module.attr`` (e.g. ``planetary_computer.sign``), or the identity."""
    if not dotted:
        return lambda href: href
    module, _, attr = dotted.rpartition(".")
    try:
        hook = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"source.stac.sign: cannot import {dotted!r} ({type(err).__name__}: {err})") from None
    if not callable(hook):
        raise ConfigError(f"source.stac.sign: {dotted!r} is not callable")
    return hook


class Turn:
    """At most one thread of a process computes at a time; a thread waiting on the network gives its turn away.

    The STAC source's threads are there to wait on the network, not to compute. Computing in all of them at once
    cost more than it gained: on 2 cores, numpy and GDAL calls of a few hundred microseconds each, spread over 2
    threads, took 1.5x the CPU time of one thread for no gain in wall time (4 threads: 3x, and slower), the
    threads handing the GIL back and forth between calls. With one turn per process, the packing processes keep
    the cores busy and the threads overlap only their waits: :meth:`computing` around a point's work,
    :meth:`waiting` around every request and every wait for another thread's load (both reentrant)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._local = threading.local()

    def _held(self) -> bool:
        return getattr(self._local, "held", False)

    @contextmanager
    def computing(self) -> Iterator[None]:
        if self._held():
            yield
            return
        self._lock.acquire()
        self._local.held = True
        try:
            yield
        finally:
            self._local.held = False
            self._lock.release()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        if not self._held():
            yield
            return
        self._local.held = False
        self._lock.release()
        try:
            yield
        finally:
            self._lock.acquire()
            self._local.held = True


class HostLimit:
    """At most ``per_host`` requests in flight to one host from this process (all its threads); a thread gives
    ``turn`` away while it waits for a slot and for the answer."""

    def __init__(self, per_host: int, turn: Turn | None = None):
        self.per_host = per_host
        self.turn = turn or Turn()
        self._slots: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    @contextmanager
    def slot(self, url: str) -> Iterator[None]:
        host = urlsplit(url).netloc or "local"
        with self._lock:
            slot = self._slots.setdefault(host, threading.BoundedSemaphore(self.per_host))
        with self.turn.waiting(), slot:
            yield


class SharedCache:
    """Values loaded once per key for all of a process's threads, least recently used dropped past ``max_items``
    or ``max_bytes`` (of the values' ``nbytes``).

    :meth:`get` runs ``load`` once per key however many threads ask at the same time: the others wait (giving
    ``turn`` away) for its value, or its error. ``loads`` counts the loads, for tests and benchmarks."""

    def __init__(self, turn: Turn, max_items: int | None = None, max_bytes: int | None = None):
        self.turn, self.max_items, self.max_bytes = turn, max_items, max_bytes
        self._values: OrderedDict[Hashable, Any] = OrderedDict()
        self._loading: dict[Hashable, Future] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self.loads = 0

    def get(self, key: Hashable, load: Callable[[], T]) -> T:
        with self._lock:
            if key in self._values:
                self._values.move_to_end(key)
                return self._values[key]
            pending = self._loading.get(key)
            if pending is None:
                mine: Future = Future()
                self._loading[key] = mine
        if pending is not None:
            with self.turn.waiting():
                return pending.result()
        try:
            value = load()
        except BaseException as err:
            with self._lock:
                del self._loading[key]
            mine.set_exception(err)
            raise
        with self._lock:
            del self._loading[key]
            self._keep(key, value)
            self.loads += 1
        mine.set_result(value)
        return value

    def get_all(self, requests: Sequence[tuple[Hashable, Callable[[], T]]], io: Executor | None) -> list[T]:
        """The values of ``(key, load)`` requests; those not held yet are loaded at the same time on ``io`` (the
        bands of a scene, the variables of a climate chunk: their requests overlap instead of following one
        another), the caller giving its turn away meanwhile."""
        with self._lock:
            missing = [(key, load) for key, load in requests if key not in self._values]
        if io is not None and len(missing) > 1:
            with self.turn.waiting():
                for _ in io.map(lambda request: self.get(*request), missing):
                    pass
        return [self.get(key, load) for key, load in requests]

    def _keep(self, key: Hashable, value: Any) -> None:
        self._values[key] = value
        self._bytes += _nbytes(value)
        while len(self._values) > 1 and (
            (self.max_items is not None and len(self._values) > self.max_items)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            self._bytes -= _nbytes(self._values.popitem(last=False)[1])


def _nbytes(value: Any) -> int:
    return getattr(value, "nbytes", 0)


def transient(err: BaseException) -> bool:
    """An error worth retrying: HTTP 429/5xx, a timeout or a dropped connection."""
    return isinstance(err, TimeoutError | ConnectionError) or bool(_TRANSIENT.search(str(err)))


def with_retries(fn: Callable[[], T], attempts: int, delay_s: float) -> T:
    """``fn()``, retried ``attempts`` times on :func:`transient` errors, waiting ``delay_s`` doubling each time."""
    for k in range(attempts + 1):
        try:
            return fn()
        except Exception as err:
            if k == attempts or not transient(err):
                raise
            time.sleep(delay_s * 2**k)
    raise AssertionError("unreachable")
