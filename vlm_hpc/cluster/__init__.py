"""Where a task runs: its Slurm environment and array specs."""
