"""Entry points: the only layer that joins a process group, reads a config and writes a run's outputs."""
