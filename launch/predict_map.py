"""`python -m launch.predict_map [--cluster slurm|local|debug] [--array N ...] --checkpoint DIR --region R
--resolution M --out map.tif [key=value ...]`: ``soilnet predict-map`` through submitit; ``--array N`` spreads the
tiles over N tasks (one Slurm job array), the last of which assembles the map."""

import sys

from launch.submit import command_main

if __name__ == "__main__":
    sys.exit(command_main("predict-map"))
