"""Submit a SoilNet job through submitit: the same job on Slurm, on this machine, or inline for debugging.

Only this package knows about schedulers (as DINOv2's ``run/submit.py``): it validates the config before
anything is submitted, maps the scheduler's task layout to the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/
``MASTER_ADDR``/``MASTER_PORT`` variables that :mod:`soilnet.distributed` reads, and requeues a preempted or
timed-out job, which then resumes from its ``output_dir``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import submitit

from soilnet.config.base import ConfigError, Section, load_config, resolved_yaml
from soilnet.jobs.commands import COMMANDS, LAUNCHED, resolve
from soilnet.rendezvous import node_address


@dataclass(frozen=True)
class JobSpec:
    """What a launcher runs: its name, config class and training entry point (``"module:function"``)."""

    name: str
    config_class: type[Section]
    entry_point: str

    @classmethod
    def of(cls, name: str) -> JobSpec:
        """The spec of the registry's command ``name`` (:data:`soilnet.jobs.commands.COMMANDS`)."""
        cmd = COMMANDS[name]
        if cmd.config_class is None:
            raise ValueError(f"{name} takes no config, so it cannot be launched")
        return cls(name, resolve(cmd.config_class), cmd.run)


def _launch_options(p: argparse.ArgumentParser, array_help: str) -> None:
    """Where and how a job runs: the options every launcher shares."""
    p.add_argument(
        "--cluster",
        choices=["slurm", "local", "debug"],
        default=None,
        help="where to run (default: slurm when sbatch is on PATH, else local)",
    )
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--tasks-per-node", type=int, default=1, help="processes per node (one per GPU)")
    p.add_argument("--gpus-per-node", type=int, default=0)
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--time", type=int, default=60, help="time limit in minutes")
    usr2 = "seconds before the time limit at which Slurm sends USR2 to checkpoint"
    p.add_argument("--signal-delay", type=int, default=120, help=usr2)
    p.add_argument("--array", type=int, default=0, help=array_help)
    p.add_argument("--logs", default=None, help="submitit log folder (default: beside the job's output)")
    p.add_argument("--wait", action="store_true", help="wait for the job and exit non-zero if it failed")


def build_parser(spec: JobSpec) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=f"python -m launch.{spec.name}",
        description=f"Submit `soilnet {spec.name}` through submitit (Slurm, local processes, or inline).",
    )
    p.add_argument("--config", required=True, help="YAML config file")
    _launch_options(p, "submit as a job array of this many tasks (packing)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit (submit nothing)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="dotted config overrides")
    return p


def export_distributed_env() -> None:
    """Map submitit's task layout to the torch.distributed env:// variables, inside a running task."""
    env = submitit.JobEnvironment()
    dist = submitit.helpers.TorchDistributedEnvironment()
    os.environ.update(
        RANK=str(env.global_rank),
        WORLD_SIZE=str(env.num_tasks),
        LOCAL_RANK=str(env.local_rank),
        LOCAL_WORLD_SIZE=str(dist.local_world_size),
        MASTER_ADDR=os.environ.get("SOILNET_MASTER_ADDR") or node_address(env.hostnames[0]),
        MASTER_PORT=os.environ.get("MASTER_PORT") or str(dist.master_port),
    )


class Job(submitit.helpers.Checkpointable):
    """One task of a job. Picklable; ``checkpoint()`` (inherited) resubmits it unchanged on preemption.

    The training entry point owns its own SIGUSR2/SIGTERM handling (all ranks agree to stop and save together)
    and reports ``{"stopped_early": True}`` when it stopped on a signal; rank 0 then asks submitit to requeue.
    """

    def __init__(self, spec: JobSpec, config_path: str, overrides: list[str]):
        self.spec = spec
        self.config_path = config_path
        self.overrides = list(overrides)

    def __call__(self):
        export_distributed_env()
        submitit_handler = signal.getsignal(signal.SIGUSR2)
        cfg = load_config(self.spec.config_class, self.config_path, self.overrides)
        result = resolve(self.spec.entry_point)(cfg)
        if isinstance(result, dict) and result.get("stopped_early") and callable(submitit_handler):
            submitit_handler(signal.SIGUSR2, None)  # rank 0: checkpoint() + scontrol requeue + exit
        return result


def make_executor(args: argparse.Namespace, log_folder: Path, name: str) -> submitit.AutoExecutor:
    executor = submitit.AutoExecutor(folder=str(log_folder), cluster=args.cluster)
    params = dict(
        name=f"soilnet-{name}",
        nodes=args.nodes,
        tasks_per_node=args.tasks_per_node,
        timeout_min=args.time,
        slurm_signal_delay_s=args.signal_delay,
        slurm_additional_parameters={"open-mode": "append"},
    )
    if args.gpus_per_node:
        params["gpus_per_node"] = args.gpus_per_node
    if args.cpus_per_task:
        params["cpus_per_task"] = args.cpus_per_task
    if args.partition:
        params["slurm_partition"] = args.partition
    if args.account:
        params["slurm_account"] = args.account
    if args.array:
        params["slurm_array_parallelism"] = args.array
    executor.update_parameters(**params)
    return executor


def submit(executor: submitit.AutoExecutor, jobs: list, name: str, log_folder: Path, wait: bool) -> int:
    """Submit ``jobs`` (more than one: as one array); with ``wait``, exit non-zero if any failed."""
    if len(jobs) > 1:
        with executor.batch():
            submitted = [executor.submit(job) for job in jobs]
    else:
        submitted = [executor.submit(jobs[0])]
    print(f"launch.{name}: submitted job {submitted[0].job_id} to {executor.cluster}; logs in {log_folder}")
    if not wait:
        return 0
    failed = 0
    for j in submitted:
        try:
            j.results()
        except Exception as err:  # submitit re-raises the task's failure here with its traceback
            failed += 1
            print(f"launch.{name}: job {j.job_id} failed:\n{err}", file=sys.stderr)
    print(f"launch.{name}: job {submitted[0].job_id} {'failed' if failed else 'finished'}; logs in {log_folder}")
    return 1 if failed else 0


def main(spec: JobSpec, argv: list[str] | None = None) -> int:
    args = build_parser(spec).parse_intermixed_args(argv)
    try:  # fail here, before anything is submitted
        cfg = load_config(spec.config_class, args.config, args.overrides)
    except ConfigError as err:
        print(f"launch.{spec.name}: error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(resolved_yaml(cfg), end="")
        return 0
    output_dir = Path(getattr(cfg, "output_dir", "outputs"))
    log_folder = Path(args.logs) if args.logs else output_dir / "submitit"
    executor = make_executor(args, log_folder / "%j", spec.name)
    config_path = str(Path(args.config).resolve())
    jobs = [Job(spec, config_path, args.overrides) for _ in range(max(1, args.array))]
    return submit(executor, jobs, spec.name, log_folder, args.wait)


class CommandJob(submitit.helpers.Checkpointable):
    """One task of a command that takes arguments rather than a config (``predict-map``): it runs
    ``python -m soilnet.cli <command> <argv>`` in the job, whose own checks and messages then apply; requeued
    unchanged on preemption (the command resumes from what it wrote)."""

    def __init__(self, command: str, argv: list[str]):
        self.command = command
        self.argv = list(argv)

    def __call__(self) -> int:
        proc = subprocess.run([sys.executable, "-m", "soilnet.cli", self.command, *self.argv], check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"soilnet {self.command} exited with {proc.returncode} (its messages are above)")
        return 0


def command_main(command: str, argv: list[str] | None = None) -> int:
    """``python -m launch.<command> [launch options] <the command's arguments>``: with ``--array N``, N tasks
    that each get ``--tasks N --task-id K`` (on Slurm one job array; locally N processes)."""
    if command not in LAUNCHED or COMMANDS[command].config_class is not None:
        raise ValueError(f"{command} is not a launchable command that takes arguments")
    p = argparse.ArgumentParser(
        prog=f"python -m launch.{command.replace('-', '_')}",
        description=f"Submit `soilnet {command}` through submitit; other arguments go to `soilnet {command}`.",
    )
    _launch_options(p, "spread the work over this many tasks, one job array (each gets --tasks N --task-id K)")
    p.add_argument("--out", required=True, help=f"soilnet {command}'s --out (the logs go beside it)")
    args, rest = p.parse_known_args(argv)
    out = Path(args.out)
    log_folder = Path(args.logs) if args.logs else out.with_name(out.name + ".submitit")
    executor = make_executor(args, log_folder / "%j", command)
    argv_out = [*rest, "--out", str(out)]
    if args.array:
        jobs = [
            CommandJob(command, [*argv_out, "--tasks", str(args.array), "--task-id", str(k)]) for k in range(args.array)
        ]
    else:
        jobs = [CommandJob(command, argv_out)]
    return submit(executor, jobs, command, log_folder, args.wait)
