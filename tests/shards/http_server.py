"""A real static HTTP server for tests and benchmarks: Debian's nginx serving a directory on loopback, answering
HTTP range requests (``206 Partial Content``) as object storage does, behind a small asyncio proxy that adds a
fixed per-request delay and injects faults.

    with serve_directory(root, delay_s=0.05) as server:
        url = server.url + "/scenes/LC08_..._SR_B4.TIF"   # through the proxy
        server.fail("/scenes/*_SR_B4.TIF", status=503, times=1)   # the next request there answers 503, then OK
        server.requests                                    # every request the proxy answered, in order

nginx runs as one foreground process (``daemon off``, ``master_process off``) with its configuration, pid, logs and
temporary paths in a private temporary directory, listening on a free loopback port; it is killed at exit. The
kernel here has no ``netem`` and nginx no delay directive, so the delay is the proxy's: it reads a request, sleeps
``delay_s`` (without holding a thread: many requests wait at once, as they would on a network), then forwards the
request unchanged (``Range`` included) to nginx over a keep-alive connection and relays the answer (``206`` and
``Content-Range`` included). Faults, checked in the order they were added, per request path (``fnmatch``
patterns on the URL path, query excluded):

- :meth:`StaticServer.fail`: answer ``status`` (503, 429, 500...) instead of the file, for the next ``times``
  requests (``None``: every request, a persistent failure);
- :meth:`StaticServer.cut`: relay only the first ``nbytes`` of the body, then close the connection (a transfer
  that breaks off; ``Content-Length`` still announces the whole);
- :meth:`StaticServer.truncate`: shorten the served file on disk (a truncated COG, served consistently);
- :meth:`StaticServer.require_query`: answer 403 to any request whose query lacks ``name=value`` (a signed URL's
  token, as a SAS token on Azure Blob storage).

:func:`serve_directory` skips the calling test, naming the missing package, where nginx is not installed.
``python tests/shards/http_server.py ROOT --delay-s 0.05`` serves until killed and prints the URL.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import pytest

NGINX_CANDIDATES = ("nginx", "/usr/sbin/nginx")
MIME_TYPES = {
    "image/tiff": "tif tiff TIF TIFF",
    "application/json": "json",
    "application/geo+json": "geojson",
}
HEAD_LIMIT = 64 * 1024  # the longest request or response head the proxy accepts


def nginx_binary() -> str | None:
    """The nginx executable, or None (Debian puts it in /usr/sbin, which a non-root PATH may lack)."""
    for name in NGINX_CANDIDATES:
        found = shutil.which(name)
        if found:
            return found
    return None


def require_nginx() -> str:
    """The nginx executable, or skip the calling test with the reason."""
    binary = nginx_binary()
    if binary is None:
        pytest.skip("nginx is not installed (Debian package nginx; scripts/setup.sh installs it as root)")
    return binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nginx_config(root: Path, state: Path, port: int) -> str:
    """A self-contained configuration: one foreground process, private paths, static files from ``root``."""
    types = "\n".join(f"        {mime} {exts};" for mime, exts in MIME_TYPES.items())
    temp = "\n".join(
        f"    {kind}_temp_path {state / kind};" for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    user = "user root root;" if os.geteuid() == 0 else ""  # as root, nginx would switch to nobody otherwise
    return f"""
daemon off;
master_process off;
worker_processes 1;
{user}
pid {state / "nginx.pid"};
error_log {state / "error.log"} warn;
events {{ worker_connections 4096; }}
http {{
    types {{
{types}
    }}
    default_type application/octet-stream;
    access_log {state / "access.log"};
{temp}
    sendfile on;
    tcp_nodelay on;
    keepalive_timeout 120s;
    keepalive_requests 1000000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        autoindex off;
        etag on;
        location / {{ try_files $uri =404; }}
    }}
}}
"""


@contextlib.contextmanager
def run_nginx(root: Path, attempts: int = 3) -> Iterator[int]:
    """nginx serving ``root`` on a free loopback port (yielded) until the block ends; the process is killed then."""
    binary = require_nginx()
    with tempfile.TemporaryDirectory(prefix="soilnet-nginx-") as tmp:
        state = Path(tmp)
        for attempt in range(attempts):
            port = free_port()  # another process may take it before nginx binds: then retry on a new one
            conf = state / "nginx.conf"
            conf.write_text(nginx_config(Path(root).resolve(), state, port))
            proc = subprocess.Popen(
                [binary, "-p", str(state), "-c", str(conf), "-e", str(state / "error.log")],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                start_new_session=True,
            )
            if _wait_listening(port, proc):
                break
            err = proc.stderr.read().decode() if proc.stderr else ""
            proc.wait()
            if attempt == attempts - 1:
                log = (state / "error.log").read_text() if (state / "error.log").exists() else ""
                raise RuntimeError(f"nginx did not start on 127.0.0.1:{port}: {err.strip()} {log.strip()}")
        try:
            yield port
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if proc.stderr:
                proc.stderr.close()


def _wait_listening(port: int, proc: subprocess.Popen, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
        time.sleep(0.02)
    return False


# -- faults and the request log ----------------------------------------------------------------------------------


@dataclass
class Fault:
    """``kind``: ``status`` (answer ``status``), ``cut`` (relay ``nbytes`` of the body, then close) or ``query``
    (403 unless the query has ``name=value``); ``times``: how many more requests it applies to (None: all)."""

    pattern: str
    kind: str
    status: int = 503
    times: int | None = None
    nbytes: int = 0
    query: tuple[str, str] | None = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class Request:
    """One request the proxy answered. ``range``: the ``Range`` header or None; ``status``: what the client got
    (an injected fault's status, or nginx's); ``nbytes``: body bytes sent; ``fault``: the injected kind or None."""

    method: str
    path: str
    query: str
    range: str | None
    status: int
    nbytes: int
    fault: str | None
    received_s: float
    answered_s: float


class Faults:
    """The proxy's fault rules and request log; thread-safe (tests change them while the proxy runs)."""

    def __init__(self):
        self.rules: list[Fault] = []
        self.requests: list[Request] = []
        self.in_flight = self.max_in_flight = 0
        self.lock = threading.Lock()

    def match(self, path: str, query: str) -> Fault | None:
        """The first rule that applies to this request (a counted rule is used up by it), or None."""
        with self.lock:
            for rule in self.rules:
                if not fnmatch.fnmatchcase(path, rule.pattern):
                    continue
                if rule.kind == "query":
                    assert rule.query is not None
                    if rule.query in parse_qsl(query, keep_blank_values=True):
                        continue
                    return rule
                if rule.times is not None:
                    if rule.times <= 0:
                        continue
                    rule.times -= 1
                return rule
        return None

    def enter(self) -> None:
        with self.lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, request: Request) -> None:
        with self.lock:
            self.in_flight -= 1
            self.requests.append(request)


# -- the delaying proxy -----------------------------------------------------------------------------------------


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    """The first line and the headers (lower-case names) of an HTTP/1.1 message head."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def status_answer(status: int, reason: str, extra: dict[str, str] | None = None) -> bytes:
    body = f"{status} {reason}\n".encode()
    lines = [f"HTTP/1.1 {status} {reason}", "Content-Type: text/plain", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


REASONS = {403: "Forbidden", 429: "Too Many Requests", 500: "Internal Server Error", 502: "Bad Gateway"}
REASONS |= {503: "Service Unavailable", 504: "Gateway Timeout"}


class DelayProxy:
    """Forwards every request to ``127.0.0.1:upstream`` after ``delay_s``, with :class:`Faults` applied."""

    def __init__(self, upstream: int, delay_s: float, faults: Faults):
        self.upstream, self.delay_s, self.faults = upstream, delay_s, faults
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name="delay-proxy", daemon=True)

    def start(self) -> int:
        self.thread.start()
        self.ready.wait()
        return self.port

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0, limit=HEAD_LIMIT, backlog=1024)
        )
        self.port = self.server.sockets[0].getsockname()[1]
        self.ready.set()
        self.loop.run_forever()
        self.loop.close()

    def stop(self) -> None:
        """Close the listening socket and every open connection, then end the loop's thread."""
        asyncio.run_coroutine_threadsafe(self._shutdown(), self.loop).result(timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)

    async def _shutdown(self) -> None:
        self.server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: list = []  # [reader, writer] of this client's keep-alive connection to nginx, once opened
        try:
            while await self._one(reader, writer, upstream):
                pass
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, asyncio.CancelledError):
            pass  # the client went away, or the server stops (a cancelled task here would log an error)
        finally:
            for w in (writer, *upstream[1:]):
                w.close()

    async def _one(self, reader, writer, upstream: list) -> bool:
        """Answer one request; False when the client's connection is to close. The request is logged before its
        answer is sent, so a client that has its answer finds it in the log."""
        head = await reader.readuntil(b"\r\n\r\n")
        received = time.monotonic()
        line, headers = parse_head(head)
        method, target = line.split(" ")[:2]
        body = await reader.readexactly(int(headers.get("content-length", 0)))
        url = urlsplit(target)
        keep = headers.get("connection", "").lower() != "close"
        self.faults.enter()
        status, nbytes, kind = 0, 0, None
        try:
            await asyncio.sleep(self.delay_s)
            rule = self.faults.match(url.path, url.query)
            kind = rule.kind if rule else None
            if rule is not None and rule.kind != "cut":
                status = 403 if rule.kind == "query" else rule.status
                answer = status_answer(status, REASONS.get(status, "Error"), rule.headers)
            else:
                status, answer, nbytes, upstream_keep = await self._fetch(head + body, method, upstream, rule)
                keep = keep and upstream_keep
        finally:
            record = Request(
                method, url.path, url.query, headers.get("range"), status, nbytes, kind, received, time.monotonic()
            )
            self.faults.leave(record)
        writer.write(answer)
        await writer.drain()
        return keep

    async def _fetch(self, request: bytes, method: str, upstream: list, rule: Fault | None):
        """Send the request to nginx: ``(status, the answer to relay, its body bytes, keep the client's
        connection)``; a ``cut`` rule shortens the body (the head still announces all of it)."""
        if not upstream:
            upstream.extend(await asyncio.open_connection("127.0.0.1", self.upstream, limit=HEAD_LIMIT))
        up_reader, up_writer = upstream
        up_writer.write(request)
        await up_writer.drain()
        head = await up_reader.readuntil(b"\r\n\r\n")
        line, headers = parse_head(head)
        status = int(line.split(" ")[1])
        length = 0 if method == "HEAD" or status in (204, 304) else int(headers.get("content-length", 0))
        body = await up_reader.readexactly(length)
        if headers.get("connection", "").lower() == "close":
            up_writer.close()
            upstream.clear()
        if rule is not None:
            return status, head + body[: rule.nbytes], min(rule.nbytes, length), False
        return status, head + body, length, True


# -- the server a test uses ------------------------------------------------------------------------------------


class StaticServer:
    """nginx serving ``root``, reached through the delaying, fault-injecting proxy at :attr:`url`;
    :attr:`origin_url` is nginx itself (no delay, no faults, not logged)."""

    def __init__(self, root: Path, origin_port: int, proxy: DelayProxy):
        self.root = Path(root)
        self.origin_url = f"http://127.0.0.1:{origin_port}"
        self.proxy = proxy
        self.url = f"http://127.0.0.1:{proxy.port}"
        self.delay_s = proxy.delay_s

    def href(self, path: str | Path) -> str:
        """The URL of a file under ``root`` (an absolute path inside ``root``, or one relative to it)."""
        rel = Path(path).resolve().relative_to(self.root.resolve()) if Path(path).is_absolute() else Path(path)
        return f"{self.url}/{rel.as_posix()}"

    # faults
    def fail(self, pattern: str, status: int = 503, times: int | None = 1, headers: dict | None = None) -> None:
        """Answer ``status`` to the next ``times`` requests whose path matches ``pattern`` (None: to all)."""
        self._add(Fault(pattern, "status", status=status, times=times, headers=dict(headers or {})))

    def cut(self, pattern: str, nbytes: int, times: int | None = None) -> None:
        """Break off the answers to matching requests after ``nbytes`` body bytes (and close the connection)."""
        self._add(Fault(pattern, "cut", nbytes=nbytes, times=times))

    def require_query(self, pattern: str, name: str, value: str) -> None:
        """Answer 403 to matching requests whose query lacks ``name=value`` (a signed URL's token)."""
        self._add(Fault(pattern, "query", status=403, query=(name, value)))

    def truncate(self, path: str | Path, nbytes: int) -> None:
        """Cut the served file (under ``root``) to its first ``nbytes`` bytes, on disk."""
        target = Path(path) if Path(path).is_absolute() else self.root / path
        with open(target, "r+b") as f:
            f.truncate(nbytes)

    def clear_faults(self) -> None:
        with self.proxy.faults.lock:
            self.proxy.faults.rules.clear()

    def _add(self, fault: Fault) -> None:
        with self.proxy.faults.lock:
            self.proxy.faults.rules.append(fault)

    # the log
    @property
    def requests(self) -> list[Request]:
        with self.proxy.faults.lock:
            return list(self.proxy.faults.requests)

    def requests_to(self, pattern: str) -> list[Request]:
        return [r for r in self.requests if fnmatch.fnmatchcase(r.path, pattern)]

    @property
    def max_in_flight(self) -> int:
        """The most requests the proxy held at once (a per-host limit shows here)."""
        return self.proxy.faults.max_in_flight

    def reset_log(self) -> None:
        with self.proxy.faults.lock:
            self.proxy.faults.requests.clear()
            self.proxy.faults.max_in_flight = self.proxy.faults.in_flight


@contextlib.contextmanager
def serve_directory(root: str | Path, delay_s: float = 0.0) -> Iterator[StaticServer]:
    """nginx serving ``root`` behind the proxy (``delay_s`` before each answer), until the block ends."""
    with run_nginx(Path(root)) as port:
        proxy = DelayProxy(port, delay_s, Faults())
        proxy.start()
        try:
            yield StaticServer(Path(root), port, proxy)
        finally:
            proxy.stop()


def main() -> None:
    """Serve ROOT until killed; stdout: one line, the proxy's URL."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("root", type=Path)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()
    with serve_directory(args.root, args.delay_s) as server:
        print(server.url, flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
