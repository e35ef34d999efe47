"""`python -m launch.pretrain --config PATH [--cluster slurm|local|debug] [--nodes N ...] [key=value ...]`."""

import sys

from launch.submit import JobSpec, main

SPEC = JobSpec.of("pretrain")

if __name__ == "__main__":
    sys.exit(main(SPEC))
