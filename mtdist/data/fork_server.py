"""Imported by the loader workers' fork server when it starts (loader.WORKER_PRELOAD), for two effects.

Slurm sends its stop signals (the time-limit SIGUSR1, submitit's SIGUSR2, a preemption's SIGTERM) to
every process of a task, the fork server included. Their default action would kill the server, and
the persistent workers it forked would then see their parent gone and exit (torch's worker watchdog),
failing the next batch the rank asks for, before the checkpoint the signal asked for. The server only
forks; the rank acts on the signals. It ends with the rank, and its workers with it (preempt.die_with_parent:
the server's own way to notice, its pipe from the rank closing, fails when a worker outlives the rank).
"""

from mtdist.preempt import die_with_parent, ignore_stop_signals

ignore_stop_signals()
die_with_parent()  # a rank killed outright takes the server with it, and the server its workers
