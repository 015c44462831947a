"""Missing data fails fast: a config naming a shard index or shard file that does not exist is refused before
the process group, DeepSpeed and the models start, naming the key and the command that writes shards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, TINY, shard_overrides

from mtdist.dist import free_port

FLAGSHIP = ROOT / "configs" / "imagenet_resnet152_10pct.yaml"
# `mtdist train` in this process, then what had started by the time it returned
PROBE = """
import gc, json, sys
import torch, torch.distributed
from mtdist.cli import main
code = main(sys.argv[1:])
import deepspeed.comm.comm as ds_comm
print(json.dumps({
    "code": code,
    "deepspeed_imported": "deepspeed" in sys.modules,
    "process_group": torch.distributed.is_initialized(),
    "deepspeed_comm": ds_comm.cdb is not None,
    "modules_built": sum(isinstance(o, torch.nn.Module) for o in gc.get_objects()),
}))
"""


def train_probe(args: list[str], cwd: Path) -> tuple[dict, str]:
    """Rank 0 of a world of 2 whose rank 1 never comes: a process group started first would wait for it
    (the timeout below would fail the test), so a prompt answer is itself evidence of the order."""
    env = os.environ | {
        "OMP_NUM_THREADS": "1",
        "RANK": "0",
        "LOCAL_RANK": "0",
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(free_port()),
    }
    proc = subprocess.run(
        [sys.executable, "-c", PROBE, "train", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


NOTHING_STARTED = {
    "code": 2,
    "deepspeed_imported": True,  # mtdist.train was imported, so the check is not merely earlier in the CLI
    "process_group": False,
    "deepspeed_comm": False,
    "modules_built": 0,
}


def test_flagship_without_its_shards_is_refused_before_deepspeed(tmp_path):
    """The issue's case: the flagship config run where data/imagenet/ was never written."""
    started, stderr = train_probe(["--config", str(FLAGSHIP)], cwd=tmp_path)
    assert started == NOTHING_STARTED
    assert (
        "mtdist: config error: data.labeled: shard index data/imagenet/train-labeled.index.json does not "
        "exist; write the shards first: `mtdist make-shards --src IMAGENET_DIR --out data/imagenet`"
    ) in stderr
    assert "write_shards" not in stderr


def test_missing_shard_file_of_an_index_is_refused_before_deepspeed(mnist_shards, tmp_path):
    val = Path(mnist_shards["val"])
    copy = tmp_path / "val"
    shutil.copytree(val.parent, copy, ignore=shutil.ignore_patterns("labeled*", "unlabeled*"))
    (copy / "val-000002.tar").unlink()
    shards = mnist_shards | {"val": str(copy / val.name)}
    args = ["--config", str(TINY), *shard_overrides(shards), f"logging.run_dir={tmp_path / 'run'}"]
    started, stderr = train_probe(args, cwd=ROOT)
    assert started == NOTHING_STARTED
    assert f"data.val: shard {copy / 'val-000002.tar'} does not exist" in stderr
    assert f"`mtdist make-shards --src IMAGENET_DIR --out {copy} ...` again rewrites missing shards" in stderr
