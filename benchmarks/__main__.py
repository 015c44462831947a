"""`python -m benchmarks`: every benchmark, see benchmarks/run.py."""

from benchmarks.run import main

main()
