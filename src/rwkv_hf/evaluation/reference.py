"""BlinkDL's `rwkv` package as the other side of our evaluations, in a subprocess.

The reference must run in its own interpreter (RWKV-7 needs RWKV_V7_ON=1 before `rwkv.model` is
imported), and loading it per document would dominate a LAMBADA run, so one process scores every
document and streams one JSON line per result back (`reference_worker.py`), read here by a thread.
The strategy is always `cpu fp32` with batch 1: the reference's own numbers, not a fast version of
them.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch

WORKER = Path(__file__).resolve().with_name("reference_worker.py")


def checkpoint_version(ckpt) -> str:
    """The RWKV version of a BlinkDL checkpoint, by its keys (only "7" matters here: RWKV_V7_ON).
    A file that is not one raises CheckpointError (a ValueError) naming it."""
    from ..convert import detect_version, load_checkpoint

    return str(detect_version(load_checkpoint(ckpt)))


def is_deep_embed(ckpt) -> bool:
    """Whether a BlinkDL checkpoint is a DeepEmbed RWKV-7 (the reference needs RWKV_DE_VERSION=1)."""
    sd = torch.load(str(ckpt), map_location="cpu", weights_only=True, mmap=True)
    return any(k.endswith("ffn.s_emb.weight") for k in sd)


def default_threads() -> int:
    return max(1, (os.cpu_count() or 2) // 2)


class ReferenceWorker:
    """One `reference_worker.py` process; `next()` returns its JSON results in order."""

    def __init__(self, ckpt, spec: dict, threads: Optional[int] = None):
        ckpt = str(ckpt)
        if not ckpt.endswith(".pth"):
            raise ValueError(f"the reference package loads BlinkDL .pth checkpoints only, got {ckpt}")
        if not Path(ckpt).is_file():
            raise FileNotFoundError(f"no such checkpoint: {ckpt}")
        version, deep_embed = checkpoint_version(ckpt), is_deep_embed(ckpt)
        self._tmp = tempfile.TemporaryDirectory(prefix="rwkv_hf_ref_")
        spec_path = Path(self._tmp.name) / "spec.json"
        spec = dict(spec, ckpt=ckpt, threads=threads or default_threads(), strategy="cpu fp32")
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        self._stderr = open(Path(self._tmp.name) / "stderr.txt", "w+", encoding="utf-8")
        env = dict(os.environ, RWKV_JIT_ON="1", RWKV_CUDA_ON="0", RWKV_V7_ON="1" if version.startswith("7") else "0",
                   RWKV_DE_VERSION="1" if deep_embed else "0")
        self.proc = subprocess.Popen(
            [sys.executable, str(WORKER), str(spec_path)],
            stdout=subprocess.PIPE, stderr=self._stderr, env=env, text=True, encoding="utf-8",
        )
        self._queue: "queue.Queue" = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.wall_s: Optional[float] = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            try:
                self._queue.put(json.loads(line))
            except ValueError:  # not ours: the worker routes stray output to stderr, but be safe
                continue
        self._queue.put(None)  # end of stream

    def _error(self) -> RuntimeError:
        self.proc.wait()
        self._stderr.seek(0)
        tail = self._stderr.read()[-3000:]
        return RuntimeError(f"the reference package failed (exit {self.proc.returncode}):\n{tail}")

    def next(self) -> dict:
        item = self._queue.get()
        if item is None:
            raise self._error()
        if item.get("done"):
            self.wall_s = item["wall_s"]
            self._queue.put(None)
            raise self._error() if self.proc.wait() else StopIteration
        return item

    def finish(self) -> None:
        """Read up to the end marker (records the worker's wall time) and wait for the exit."""
        while self.wall_s is None:
            item = self._queue.get()
            if item is None:
                raise self._error()
            if item.get("done"):
                self.wall_s = item["wall_s"]
        if self.proc.wait():
            raise self._error()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout:
            self.proc.stdout.close()
        self._stderr.close()
        self._tmp.cleanup()


class ReferenceLambada(ReferenceWorker):
    """The reference's LAMBADA results for `docs` ((context, target) pairs), one document at a time."""

    def __init__(self, ckpt, docs: Sequence[Tuple[str, str]], threads: Optional[int] = None):
        super().__init__(ckpt, {"mode": "lambada", "docs": [list(d) for d in docs]}, threads)

    def next_result(self) -> dict:
        item = self.next()
        return {key: item[key] for key in ("logprob", "correct", "argmax")}  # a DocResult's fields


def reference_perplexity(ckpt, text_file, chunk: int, threads: Optional[int] = None) -> Tuple[float, int, float]:
    """(sum of log-probs, token count, wall seconds) of `text_file` by the reference, in chunks."""
    worker = ReferenceWorker(ckpt, {"mode": "ppl", "text_file": str(text_file), "chunk": int(chunk)}, threads)
    try:
        total, count = 0.0, 0
        while True:
            try:
                item = worker.next()
            except StopIteration:
                break
            total += item["logprob"]
            count += item["n"]
        return total, count, worker.wall_s
    finally:
        worker.close()
