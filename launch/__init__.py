"""Slurm launch for mtdist: `mtdist submit --config FILE [key=value ...] [--dry-run] [--wait]`.

This folder (launch/ in the repository) installs as `mtdist.launch`. It is the only place that knows
submitit; the rest of mtdist reads only the torch.distributed environment contract. Nothing is imported
here, so that `python -m mtdist.launch.submit` runs the module once.
"""
