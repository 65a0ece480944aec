"""Training runs under torchrun (DDP over gloo) with no code change."""

import json
import os
import subprocess
import sys
from pathlib import Path

from llmrec.training.checkpoint import CheckpointLayout

TINY = Path(__file__).parents[1] / "fixtures" / "tiny"


def test_two_cpu_processes_train_in_lockstep_and_rank0_writes_the_checkpoint(tmp_path):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "llmrec.training.train", "--data", str(TINY), "--out", str(tmp_path), "--max-steps", "3",
               "--batch-size", "4", "--eval-users", "10"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 3
    assert (CheckpointLayout.of_run(tmp_path).encoder / "model.safetensors").is_file()
    assert result.stdout.count("full ranking:") == 1  # only rank 0 evaluates and reports
