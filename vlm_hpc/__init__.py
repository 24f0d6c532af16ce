"""vlm_hpc: exact InternVL-Chat-V1.5 captioning of image datasets on Slurm job arrays."""

__version__ = "0.1.0"
