"""Slurm launch for mtdist: `python -m launch.submit --config FILE [key=value ...] [--dry-run]`.

launch/ is the only place that knows submitit; mtdist itself reads only the torch.distributed
environment contract. Nothing is imported here so that `python -m launch.submit` runs the module once.
"""
