"""`python -m launch.finetune --config PATH [--cluster slurm|local|debug] [--nodes N ...] [key=value ...]`."""

import sys

from launch.submit import JobSpec, main

SPEC = JobSpec.of("finetune")

if __name__ == "__main__":
    sys.exit(main(SPEC))
