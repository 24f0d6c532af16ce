"""Where a task runs: its Slurm environment, array specs, and every Slurm command (squeue, scontrol)."""
