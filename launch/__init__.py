"""Launchers for multi-host training: TPU pods (`launch.tpu_pod`) and SLURM GPU clusters (`launch.slurm`)."""
