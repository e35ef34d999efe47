"""`python -m launch.finetune --config PATH [--cluster slurm|local|debug] [--nodes N ...] [key=value ...]`."""

import sys

from launch.submit import JobSpec, main
from soilnet.config.finetune import FinetuneConfig

SPEC = JobSpec("finetune", FinetuneConfig, "soilnet.train.finetune:run")

if __name__ == "__main__":
    sys.exit(main(SPEC))
