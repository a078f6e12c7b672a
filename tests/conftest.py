"""Shared by every test file: one thread per test process, and how to run a script as a user would."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# Scripts run in a subprocess on one thread: small convolutions on 2 OpenMP threads are ~50x slower than on
# one when the other core is busy (the threads spin waiting for each other).
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
# The suite checks CPU numerics (CI has no GPU): a test that trains with --device auto and recomputes a metric
# on the CPU must not find a GPU on a GPU machine. scripts/gpu_check.sh runs every script on a CUDA GPU.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
ENV["CUDA_VISIBLE_DEVICES"] = ""
for _k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):  # a stray torchrun env would turn every run into DDP
    ENV.pop(_k, None)


@pytest.fixture(autouse=True, scope="session")
def one_thread():
    """The tests themselves on one thread too: fast on a shared 2-core machine, the other core left alone."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_script(script: str, *flags, timeout: int = 300) -> subprocess.CompletedProcess:
    """python SCRIPT FLAGS... from the repository root, as a user runs it: (returncode, stdout, stderr)."""
    return subprocess.run([sys.executable, script, *flags], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def leave_together(tmp, rank: int, world_size: int = 2, timeout: float = 60.0) -> None:
    """The last call of a spawned worker, after destroy_process_group: rank 0 hosts the c10d store, so it waits
    until every rank has torn down its process group before it exits. A rank still tearing down when the store
    goes away can abort ("terminate called without an active exception"), which made CI flaky."""
    Path(tmp, f"left{rank}").touch()
    deadline = time.time() + timeout
    while rank == 0 and time.time() < deadline:
        if all(Path(tmp, f"left{r}").exists() for r in range(world_size)):
            break
        time.sleep(0.05)
