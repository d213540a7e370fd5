"""Training on two processes through existing engines (torch DDP, FSDP2 `fully_shard`, transformers'
Trainer under torchrun) gives the loss and gradients of one process on the whole batch.

On CPU (CI) the two processes talk over gloo; with two CUDA GPUs the same worker runs over NCCL (marked
gpu). What a user runs: `torchrun --nproc_per_node N train.py` (or `accelerate launch`) with a Trainer
script, or their own loop with DDP / fully_shard; nothing RWKV-specific, and DDP needs no
`find_unused_parameters`.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).with_name("distributed_worker.py")
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1", "OMP_NUM_THREADS": "1"}


def launch(engine, version, out, gpus: bool):
    env = dict(os.environ, **ENV)
    if not gpus:
        env["CUDA_VISIBLE_DEVICES"] = ""
    with socket.socket() as s:  # a free port of our own (two launches at once under pytest-xdist)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(port), str(WORKER), engine, version, str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    lines = [(Path(out) / f"rank{r}.txt").read_text() for r in (0, 1) if (Path(out) / f"rank{r}.txt").exists()]
    print("\n".join(lines))
    assert res.returncode == 0 and len(lines) == 2, "\n".join(lines) + res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "trainer"])
def test_two_processes_match_one_on_cpu(engine, version, tmp_path):
    launch(engine, version, tmp_path, gpus=False)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("version", ["6", "7"])
@pytest.mark.parametrize("engine", ["ddp", "fsdp", "trainer"])
def test_two_gpus_match_one(engine, version, tmp_path):
    launch(engine, version, tmp_path, gpus=True)
