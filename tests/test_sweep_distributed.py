"""sdexplore sweep under torchrun: two processes (accelerate's PartialState(cpu=True), gloo) give exactly the
outputs and index of one process."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from sdexplore.embedded import scenes
from sdexplore.sweeps import sweep

pytestmark = pytest.mark.slow


def _tree(folder):
    """Every file under ``folder/items`` → its SHA-256 (a manifest's without its timing and process, ``run``)."""
    out = {}
    for p in sorted((folder / "items").rglob("*")):
        if p.is_file():
            data = p.read_bytes()
            if p.name == "manifest.json":
                manifest = json.loads(data)
                del manifest["run"]
                data = json.dumps(manifest, sort_keys=True).encode()
            out[str(p.relative_to(folder))] = hashlib.sha256(data).hexdigest()
    return out


def test_two_processes_make_exactly_what_one_makes(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(scenes.validation_prompts()[:6]) + "\n")  # × 2 seeds: 12 items
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += ["-m", "sdexplore", "sweep", str(prompts), "--seeds", "0", "1", "--steps", "2", "--out", str(two)]
    done = subprocess.run(cmd + ["--no-progress"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "12/12 items done" in done.stdout and "6 made by this process" in done.stdout

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's processes (OMP_NUM_THREADS=1)
    try:
        one = tmp_path / "one"
        result = sweep(prompts, one, seeds=[0, 1], steps=2, progress=False)
    finally:
        torch.set_num_threads(threads)
    assert result.made == 12

    assert _tree(two) == _tree(one) and len(_tree(one)) == 12 * 5  # image, maps, steps, scene, manifest

    def index(folder):
        rows = [json.loads(line) for line in (folder / "index.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("seconds", "rank")} for r in rows], rows

    (a, rows_two), (b, _) = index(two), index(one)
    assert a == b and [r["item"] for r in a] == list(range(12))
    assert [r["rank"] for r in rows_two] == [0] * 6 + [1] * 6  # split_between_processes: contiguous halves
    settings = [json.loads((f / "sweep.json").read_text())["settings"] for f in (one, two)]
    assert settings[0] == settings[1]
