"""The STAC source's shared machinery (shards/sources/transport.py): one computing thread at a time, the turn given
away around requests, and caches that load a key once for all threads and load several keys at the same time."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from shards.sources.transport import HostLimit, SharedCache, Turn

WAIT_S = 10  # generous: a deadlock fails the test instead of hanging it


def run_threads(n: int, target) -> None:
    threads = [threading.Thread(target=target, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT_S)
        assert not t.is_alive(), "a thread is stuck: deadlock"


def test_one_thread_computes_at_a_time_and_a_request_gives_the_turn_away():
    turn = Turn()
    limit = HostLimit(8, turn)
    inside, most, requests_in_flight, most_requests = [0], [0], [0], [0]
    lock = threading.Lock()
    all_waiting = threading.Barrier(4, timeout=WAIT_S)

    def work(_: int) -> None:
        with turn.computing(), turn.computing():  # reentrant
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            time.sleep(0.01)
            with lock:
                inside[0] -= 1
            with limit.slot("http://host/file.tif"):  # the four meet here: only if each gave its turn away
                with lock:
                    requests_in_flight[0] += 1
                    most_requests[0] = max(most_requests[0], requests_in_flight[0])
                all_waiting.wait()
                with lock:
                    requests_in_flight[0] -= 1
            with lock:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            with lock:
                inside[0] -= 1

    run_threads(4, work)
    assert most == [1] and most_requests == [4]


def test_waiting_outside_the_turn_changes_nothing():
    turn = Turn()
    with turn.waiting():  # not computing: nothing to give away, nothing taken back
        pass
    with turn.computing():
        with turn.waiting():
            with turn.waiting():
                pass
        assert not turn._lock.acquire(blocking=False)  # held again after the wait
    assert turn._lock.acquire(blocking=False)


def test_a_key_is_loaded_once_however_many_threads_ask_and_an_error_reaches_them_all():
    cache = SharedCache(Turn())
    calls, started = [], threading.Event()

    def load() -> np.ndarray:
        calls.append(1)
        started.set()
        time.sleep(0.05)
        return np.arange(4)

    got = []
    run_threads(8, lambda k: got.append(cache.get("a", load)))
    assert len(calls) == 1 and cache.loads == 1 and all(g is got[0] for g in got)

    def broken() -> np.ndarray:
        time.sleep(0.05)
        raise OSError("http://host/b.tif: read failed")

    errors = []

    def ask(_: int) -> None:
        try:
            cache.get("b", broken)
        except OSError as err:
            errors.append(str(err))

    run_threads(4, ask)
    assert errors and all("b.tif" in e for e in errors)
    assert cache.get("b", lambda: np.zeros(1)).shape == (1,)  # a failed key is loaded anew later


def test_the_least_recently_used_go_past_the_budget():
    by_bytes = SharedCache(Turn(), max_bytes=3 * 800)
    for k in range(5):
        by_bytes.get(k, lambda: np.zeros(100))  # 800 bytes each
    by_bytes.get(2, lambda: pytest.fail("2 is held"))
    by_bytes.get(5, lambda: np.zeros(100))
    assert sorted(by_bytes._values) == [2, 4, 5]
    by_items = SharedCache(Turn(), max_items=2)
    for k in range(4):
        by_items.get(k, list)
    assert list(by_items._values) == [2, 3]


def test_get_all_loads_the_missing_keys_at_the_same_time_with_the_turn_given_away():
    turn = Turn()
    cache = SharedCache(turn)
    cache.get("held", lambda: "kept")
    met = threading.Barrier(3, timeout=WAIT_S)  # three loads that only finish together: they must overlap

    def load(k: int):
        def run() -> int:
            assert turn._lock.acquire(blocking=False)  # the caller gave its turn away
            turn._lock.release()
            met.wait()
            return k

        return run

    with ThreadPoolExecutor(4) as io, turn.computing():
        got = cache.get_all([(k, load(k)) for k in range(3)] + [("held", lambda: pytest.fail("held"))], io)
    assert got == [0, 1, 2, "kept"] and cache.loads == 4
