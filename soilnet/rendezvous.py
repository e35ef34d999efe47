"""The rendezvous address of a Slurm allocation: its first node, as the IP of that node's ``NodeAddr``.

One implementation for every launcher: a bare ``srun`` (:func:`soilnet.distributed.environment`), submitit
(``launch/submit.py``) and the sbatch scripts (``slurm/common.sh`` runs ``python -m soilnet.rendezvous``).
It needs only the standard library, so a login node submits without importing torch.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys


def _scontrol(*args: str) -> str:
    """``scontrol``'s output, or "" where there is no Slurm (no command, no controller, a timeout)."""
    try:
        shown = subprocess.run(["scontrol", *args], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return shown.stdout if shown.returncode == 0 else ""


def first_host(nodelist: str) -> str:
    """The first node of a Slurm node list: ``scontrol show hostnames``, or read from the list without Slurm."""
    hosts = _scontrol("show", "hostnames", nodelist).split()
    if hosts:
        return hosts[0]
    # "node[01-03,07]" -> "node01"; "a,b" -> "a"
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        head = prefix + rest.split("-")[0].split("]")[0]
    return head


def node_address(host: str) -> str:
    """An IP for the Slurm node ``host``: its ``NodeAddr`` when Slurm knows one, else what the resolver says.

    gloo and nccl are happier with addresses than with names, and a node's name need not resolve at all where
    slurm.conf gives each node a ``NodeAddr``.
    """
    shown = _scontrol("show", "node", host, "-o").split()
    addr = next((t.split("=", 1)[1] for t in shown if t.startswith("NodeAddr=")), host) or host
    try:
        return socket.gethostbyname(addr)
    except OSError:
        return addr


def head_address(nodelist: str | None = None) -> str | None:
    """The rendezvous address of an allocation: its first node as an IP (:func:`node_address`).

    ``nodelist`` defaults to this step's or this job's node list; None outside Slurm. The sbatch scripts
    (slurm/common.sh), the launchers (launch/submit.py) and a bare ``srun`` (:func:`environment`) all call this.
    """
    nodes = nodelist or os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    return node_address(first_host(nodes)) if nodes else None


if __name__ == "__main__":
    # slurm/common.sh: MASTER_ADDR=$(python -m soilnet.rendezvous "$SLURM_JOB_NODELIST")
    print(head_address(sys.argv[1] if len(sys.argv) > 1 else None) or "")
