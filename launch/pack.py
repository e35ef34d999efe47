"""`python -m launch.pack --config PATH [--cluster slurm|local|debug] [--nodes N ...] [key=value ...]`."""

import sys

from launch.submit import JobSpec, main
from soilnet.config.pack import PackConfig

SPEC = JobSpec("pack", PackConfig, "shards.pack:run")

if __name__ == "__main__":
    sys.exit(main(SPEC))
