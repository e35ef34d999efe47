"""slurm/common.sh requeues a job whose ranks stopped early with a checkpoint (exit 75), and says how to go on when
the site refuses the requeue instead of failing as if the run were lost."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

FAKE_SCONTROL = """#!/bin/sh
# records its arguments; `scontrol requeue` fails when REQUEUE_FAILS is set, as on a site that forbids it
echo "$@" >> "$CALLS"
if [ "$1" = requeue ] && [ -n "$REQUEUE_FAILS" ]; then echo "scontrol: error: Requeue not allowed" >&2; exit 1; fi
exit 0
"""


def requeue(tmp_path, repo_root, rc: int, fails: bool) -> tuple[subprocess.CompletedProcess, str]:
    """``requeue_if_stopped_early rc`` from slurm/common.sh under ``set -e``, with a fake ``scontrol``."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(FAKE_SCONTROL)
    (bin_dir / "scontrol").chmod(0o755)
    calls = tmp_path / "calls"
    calls.write_text("")
    env = {
        **os.environ,
        "PATH": os.pathsep.join([str(bin_dir), os.path.dirname(sys.executable), os.environ["PATH"]]),
        "SLURM_SUBMIT_DIR": str(repo_root),
        "SLURM_JOB_ID": "7",
        "SLURM_JOB_NODELIST": "solo",
        "DS_ACCELERATOR": "cpu",
        "CALLS": str(calls),
        "REQUEUE_FAILS": "1" if fails else "",
    }
    script = f"set -euo pipefail; source slurm/common.sh >/dev/null; requeue_if_stopped_early {rc}"
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, cwd=repo_root, env=env)
    return proc, calls.read_text()


@pytest.mark.parametrize("fails, expected_rc", [(False, 0), (True, 75)], ids=["requeued", "requeue-refused"])
def test_an_early_stop_requeues_the_job_or_says_to_resubmit(tmp_path, repo_root, fails, expected_rc):
    proc, calls = requeue(tmp_path, repo_root, 75, fails)
    assert "requeue 7" in calls
    assert proc.returncode == expected_rc, proc.stderr
    if fails:
        assert "could not requeue job 7; resubmit the same sbatch command to resume" in proc.stderr


def test_any_other_exit_code_is_the_jobs_own_and_nothing_is_requeued(tmp_path, repo_root):
    proc, calls = requeue(tmp_path, repo_root, 3, fails=False)
    assert proc.returncode == 3
    assert "requeue" not in calls
