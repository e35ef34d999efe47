"""The test cluster itself: two nodes, each in its own network namespace, reachable from each other."""

import pytest

pytestmark = pytest.mark.slurm


def test_srun_spans_both_nodes_with_their_own_addresses(slurm_cluster):
    out = slurm_cluster.cmd(
        "srun",
        "-N2",
        "--ntasks-per-node=1",
        "bash",
        "-c",
        "echo $SLURMD_NODENAME $(ip -4 -o addr show sn0 | awk '{print $4}')",
    ).stdout
    seen = dict(line.split() for line in out.splitlines())
    assert seen == {"node1": "10.231.7.11/24", "node2": "10.231.7.12/24"}
