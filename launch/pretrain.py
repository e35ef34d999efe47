"""`python -m launch.pretrain --config PATH [--cluster slurm|local|debug] [--nodes N ...] [key=value ...]`."""

import sys

from launch.submit import JobSpec, main
from soilnet.config.pretrain import PretrainConfig

SPEC = JobSpec("pretrain", PretrainConfig, "soilnet.train.pretrain:run")

if __name__ == "__main__":
    sys.exit(main(SPEC))
