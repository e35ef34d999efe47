"""Orderly stops on SIGUSR2/SIGTERM, shared by pretraining and fine-tuning.

Slurm sends SIGUSR2 ``--signal=USR2@120`` before the time limit, and SIGTERM on ``scancel`` or preemption. The
handler only sets a flag; the training loop looks at it after each step (all ranks agree through an all-reduce),
saves, and the command exits with :data:`EXIT_STOPPED_EARLY` so that ``slurm/common.sh`` requeues the job.
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

# EX_TEMPFAIL: every rank stopped on a signal after a checkpoint was saved; run the same command again to resume.
EXIT_STOPPED_EARLY = 75

STOP_SIGNALS = (signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    """Set by SIGUSR2/SIGTERM; the loop all-reduces it so every rank stops at the same step."""

    def __init__(self):
        self.raised = False
        self.signal = None

    def __call__(self, signum, frame):
        self.raised = True
        self.signal = signum


class StoppedEarly(Exception):
    """Raised by a training loop after it saved its state on a stop signal; the command exits with 75."""


@contextmanager
def stop_signals_blocked():
    """Block the stop signals while DataLoader workers are forked, so the workers inherit them blocked.

    Slurm signals every process of a job step, workers included, and torch's workers die on a SIGTERM that is not
    their parent's; the main process then fails on the dead worker instead of saving. A signal that arrives here
    stays pending in the main process and is handled when the block is lifted. (Workers are forked: the default
    multiprocessing context on Linux.)
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def ignore_stop_signals() -> None:
    """After an orderly stop the process only exits: from here on SIGUSR2/SIGTERM are ignored.

    ``srun --kill-on-bad-exit`` sends SIGTERM to the other tasks as soon as the first one has exited (75 is not
    0); a rank still shutting down would die of it, srun would report the kill instead of 75, and the job script
    would not requeue."""
    for s in STOP_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


@contextmanager
def stop_on_signals(flag: StopFlag):
    """Route SIGUSR2 and SIGTERM to ``flag`` inside the block; the previous handlers come back after it."""
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in previous:
        signal.signal(s, flag)
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
