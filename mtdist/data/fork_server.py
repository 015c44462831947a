"""Imported by the loader workers' fork server when it starts (loader.WORKER_PRELOAD), for one effect.

Slurm sends its stop signals (the time-limit SIGUSR1, submitit's SIGUSR2, a preemption's SIGTERM) to
every process of a task, the fork server included. Their default action would kill the server, and
the persistent workers it forked would then see their parent gone and exit (torch's worker watchdog),
failing the next batch the rank asks for, before the checkpoint the signal asked for. The server only
forks; the rank acts on the signals. It ends by itself when the rank does (its pipe to the rank closes).
"""

from mtdist.preempt import ignore_stop_signals

ignore_stop_signals()
