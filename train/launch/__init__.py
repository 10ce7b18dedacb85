"""Stage 3 from Python: submit trainings and sweeps to SLURM (or locally) with submitit.

``train.launch.submit(config, overrides, nodes=..., gpus_per_node=...)`` and ``train.launch.sweep(...)``;
``python -m train.launch`` is the same from the shell. The code is in executor.py.
"""
from train.launch.executor import TrainingJob, check_config, grid_points, point_name, submit, sweep

__all__ = ["TrainingJob", "check_config", "grid_points", "point_name", "submit", "sweep"]
