"""keys_worker.py with ZeRO's optimizer state saved in the rigid layout, as mtdist saved data.order=global
checkpoints before it used the elastic one (plan._elastic): for test_resume_moved.py."""

from __future__ import annotations

import sys

import keys_worker

import mtdist.plan

mtdist.plan._elastic = lambda cfg: {}

if __name__ == "__main__":
    keys_worker.main(sys.argv[1], sys.argv[2], sys.argv[3:])
