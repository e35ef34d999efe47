"""A real two-node Slurm cluster on this machine, for tests: munge, slurmctld, and one slurmd per node.

Each node is a network namespace joined to a bridge by a veth pair, so tasks on different nodes talk over a real
link with their own addresses (and gloo binds to the namespace's interface). ``slurmd -N <node>`` is started
with ``nsenter --net=`` rather than ``ip netns exec``, which remounts /sys and then breaks slurmd. Every state,
log and socket lives in one temp folder; :meth:`SlurmCluster.stop` tears down daemons, namespaces and bridge.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "srun", "ip", "nsenter")
IFNAME = "sn0"  # the node's interface name inside its namespace (names are per namespace)


def why_unavailable() -> str | None:
    """Why a cluster cannot be started here, or None when it can."""
    if os.geteuid() != 0:
        return "the Slurm tests start munge, slurmctld and slurmd as root; not running as root"
    missing = [b for b in BINARIES if shutil.which(b) is None]
    if missing:
        return f"missing {missing}: install Debian's slurm-wlm and munge (scripts/setup.sh does, as root)"
    return None


def _run(*argv: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(argv, check=check, capture_output=True, text=True)


@dataclass
class SlurmCluster:
    """Handle on a running test cluster; ``env`` holds what a client command needs (``SLURM_CONF``)."""

    root: Path
    nodes: dict[str, str]  # node name -> IP
    subnet: str
    bridge: str
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf), "GLOO_SOCKET_IFNAME": IFNAME}

    def cmd(self, *argv: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        return proc

    # -- jobs ------------------------------------------------------------------------------------------------
    def sbatch(self, *argv: str, cwd: Path | None = None) -> int:
        out = subprocess.run(
            ["sbatch", "--parsable", *argv], env=self.env, capture_output=True, text=True, cwd=cwd, timeout=60
        )
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed: {out.stderr}")
        return int(out.stdout.strip().split(";")[0])

    def job_state(self, job_id: int | str) -> str:
        out = self.cmd("scontrol", "show", "job", str(job_id), "-o", check=False).stdout
        for token in out.split():
            if token.startswith("JobState="):
                return token.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: int | str, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"), timeout=300):
        deadline = time.time() + timeout
        while time.time() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s")

    def wait_nodes_idle(self, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = self.cmd("sinfo", "-h", "-N", "-o", "%N %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if len(states) == len(self.nodes) and all(s in ("idle", "mix", "alloc") for s in states.values()):
                return
            time.sleep(0.5)
        raise TimeoutError(f"nodes not up: {self.cmd('sinfo', '-N', check=False).stdout}\n{self.logs()}")

    # -- nodes -----------------------------------------------------------------------------------------------
    def start_slurmd(self, node: str) -> None:
        log = open(self.root / "log" / f"slurmd-{node}.out", "ab")  # noqa: SIM115 - handed to the daemon
        self.procs[f"slurmd-{node}"] = subprocess.Popen(
            ["nsenter", f"--net=/run/netns/{self.netns(node)}", "slurmd", "-D", "-N", node, "-f", str(self.conf)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def kill_slurmd(self, node: str) -> None:
        proc = self.procs.pop(f"slurmd-{node}", None)
        if proc and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def lose_node(self, node: str) -> None:
        """Everything on ``node`` dies at once (slurmd, step daemons, tasks), as when a machine goes down."""
        self.kill_slurmd(node)
        for pid in _run("ip", "netns", "pids", self.netns(node), check=False).stdout.split():
            try:
                os.kill(int(pid), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass

    def resume_node(self, node: str) -> None:
        self.start_slurmd(node)
        self.cmd("scontrol", "update", f"NodeName={node}", "State=RESUME", check=False)
        self.wait_nodes_idle()

    def netns(self, node: str) -> str:
        return f"{self.bridge}-{node}"

    def logs(self) -> str:
        out = []
        for f in sorted((self.root / "log").glob("*")):
            out.append(f"--- {f.name}\n" + "\n".join(f.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(out)

    # -- teardown --------------------------------------------------------------------------------------------
    def stop(self) -> None:
        self.cmd("scancel", "--full", "--user=root", check=False)
        for name, proc in list(self.procs.items()):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                    proc.wait(timeout=10)
                except (ProcessLookupError, subprocess.TimeoutExpired):
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
            self.procs.pop(name, None)
        for node in self.nodes:
            pids = _run("ip", "netns", "pids", self.netns(node), check=False).stdout.split()
            for pid in pids:
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass
            _run("ip", "netns", "del", self.netns(node), check=False)
        _run("ip", "link", "del", self.bridge, check=False)


def _write_conf(root: Path, nodes: dict[str, str], ctl_ip: str, cpus: int) -> None:
    lines = f"""
ClusterName=soilnettest
SlurmctldHost={socket.gethostname()}({ctl_ip})
SlurmctldPort=16817
SlurmdPort=16818
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge.sock
SlurmUser=root
SlurmdUser=root
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobRequeue=1
SlurmdTimeout=10
SlurmctldTimeout=10
InactiveLimit=0
KillWait=20
MinJobAge=600
JobCompType=jobcomp/none
""".strip().splitlines()
    for name, ip in nodes.items():
        lines.append(f"NodeName={name} NodeAddr={ip} CPUs={cpus} State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES")
    (root / "slurm.conf").write_text("\n".join(lines) + "\n")


def start_cluster(root: Path, n_nodes: int = 2, bridge: str = "snbr0", subnet: str = "10.231.7") -> SlurmCluster:
    """Start munge, slurmctld and ``n_nodes`` slurmd in namespaces; returns once every node is idle."""
    for sub in ("state", "spool", "run", "log"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    nodes = {f"node{i + 1}": f"{subnet}.{11 + i}" for i in range(n_nodes)}
    for node in nodes:
        (root / "spool" / node).mkdir(exist_ok=True)
    ctl_ip = f"{subnet}.1"
    cluster = SlurmCluster(root=root, nodes=nodes, subnet=subnet, bridge=bridge)
    try:
        _run("ip", "link", "del", bridge, check=False)
        _run("ip", "link", "add", bridge, "type", "bridge")
        _run("ip", "addr", "add", f"{ctl_ip}/24", "dev", bridge)
        _run("ip", "link", "set", bridge, "up")
        for i, (node, ip) in enumerate(nodes.items()):
            ns, host_end = cluster.netns(node), f"{bridge}v{i}"
            _run("ip", "netns", "del", ns, check=False)
            _run("ip", "link", "del", host_end, check=False)  # a pair left behind by a killed earlier run
            _run("ip", "netns", "add", ns)
            _run("ip", "link", "add", host_end, "type", "veth", "peer", "name", IFNAME, "netns", ns)
            _run("ip", "link", "set", host_end, "master", bridge)
            _run("ip", "link", "set", host_end, "up")
            _run("ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", IFNAME)
            _run("ip", "-n", ns, "link", "set", IFNAME, "up")
            _run("ip", "-n", ns, "link", "set", "lo", "up")
            _run("ip", "-n", ns, "route", "add", "default", "via", ctl_ip)

        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        cluster.procs["munged"] = subprocess.Popen(
            [
                "munged",
                "-F",
                "--force",
                f"--key-file={key}",
                f"--socket={root}/munge.sock",
                f"--pid-file={root}/run/munged.pid",
                f"--log-file={root}/log/munged.log",
                f"--seed-file={root}/run/munged.seed",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.time() + 10
        while not (root / "munge.sock").exists() and time.time() < deadline:
            time.sleep(0.1)

        _write_conf(root, nodes, ctl_ip, cpus=os.cpu_count() or 2)
        log = open(root / "log" / "slurmctld.out", "ab")  # noqa: SIM115 - handed to the daemon
        cluster.procs["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i", "-f", str(cluster.conf)],
            env=cluster.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        time.sleep(1)
        for node in nodes:
            cluster.start_slurmd(node)
        cluster.wait_nodes_idle()
    except Exception as err:
        logs = cluster.logs()
        cluster.stop()
        detail = err.stderr if isinstance(err, subprocess.CalledProcessError) else ""
        raise RuntimeError(f"could not start the test cluster: {err!r} {detail}\n{logs}") from err
    return cluster
