"""`rwkv-hf demo [CKPT]`: the whole path, checked, in under a minute, without a network.

1. a checkpoint: CKPT, or a small seeded random RWKV-7 in BlinkDL's layout (`rwkv_hf.testing`);
2. convert it to a Hugging Face folder;
3. load it with AutoTokenizer / AutoModelForCausalLM the installed way, and the `trust_remote_code`
   way in a separate interpreter where `rwkv_hf` cannot be imported;
4. generate greedily for three prompts as one left-padded batch, and check the batch gives the same
   tokens as each prompt alone, and as the remote-code load;
5. when BlinkDL's `rwkv` package is installed, check the logits against it.
"""

from __future__ import annotations

import json
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, List, Optional

import torch

PROMPTS = ["The capital of France is", "User: Tell me about RWKV.\n\nAssistant:", "def fibonacci(n):"]
NEW_TOKENS = 16

_REMOTE_SCRIPT = r"""
import json, sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, prompts, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
tok.padding_side = "left"
batch = tok(prompts, return_tensors="pt", padding=True)
with torch.no_grad():
    out = model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=0)
print(json.dumps({"classes": [type(tok).__name__, type(model).__module__ + "." + type(model).__name__],
                  "tokens": out[:, batch["input_ids"].shape[1]:].tolist()}))
"""


@dataclass
class DemoReport:
    checkpoint: str
    synthetic: bool
    summary: str = ""
    prompts: List[str] = field(default_factory=list)
    completions: List[str] = field(default_factory=list)
    batch_equals_single: Optional[bool] = None
    remote_equals_installed: Optional[bool] = None
    remote_classes: List[str] = field(default_factory=list)
    reference_rel_diff: Optional[float] = None
    reference_note: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        checks = [self.batch_equals_single, self.remote_equals_installed]
        if self.reference_rel_diff is not None:
            checks.append(self.reference_rel_diff <= 1e-4)
        return all(c is not False for c in checks)

    @property
    def skipped(self) -> List[str]:
        """The checks that did not run (a skipped check is not a passed one)."""
        out = []
        if self.remote_equals_installed is None:
            out.append("trust_remote_code")
        if self.reference_rel_diff is None:
            out.append("reference")
        return out


def _greedy(model, tok, prompts, n):
    tok.padding_side = "left"
    batch = tok(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**batch, do_sample=False, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=0)
    return out[:, batch["input_ids"].shape[1] :].tolist()


def run_demo(
    ckpt: Optional[str] = None,
    workdir: Optional[str] = None,
    log: Callable[[str], None] = print,
    remote: bool = True,
    reference: bool = True,
    new_tokens: int = NEW_TOKENS,
) -> DemoReport:
    import rwkv_hf  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .convert import convert_checkpoint, export_checkpoint
    from .testing import reference_available, run_reference, run_without_rwkv_hf, save_checkpoint

    start = time.time()
    with tempfile.TemporaryDirectory(prefix="rwkv-hf-demo-", dir=workdir) as tmp:
        tmp = Path(tmp)
        synthetic = ckpt is None
        if synthetic:
            ckpt = str(save_checkpoint(tmp / "rwkv7-demo.pth", "7", n_layer=2, n_embd=128, seed=0))
            log(f"[1/5] built a random RWKV-7 checkpoint in BlinkDL's layout (2 layers, width 128): {Path(ckpt).name}")
        else:
            log(f"[1/5] checkpoint: {ckpt}")
        report = DemoReport(checkpoint=str(ckpt), synthetic=synthetic, prompts=list(PROMPTS))
        folder = tmp / "hf-model"
        conv = convert_checkpoint(ckpt, folder, log=lambda s: log("      " + s))
        report.summary = conv.summary
        log(f"[2/5] converted to {folder.name}/: " + ", ".join(sorted(p.name for p in folder.iterdir() if not p.name.endswith(".py"))))

        tok = AutoTokenizer.from_pretrained(folder)
        # the two checks in other interpreters start now and run while this one generates
        pool = ThreadPoolExecutor(max_workers=2)
        remote_job = ref_job = None
        if remote:
            env = {"HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp / "modules"), "TRANSFORMERS_VERBOSITY": "error"}
            remote_job = pool.submit(
                run_without_rwkv_hf, _REMOTE_SCRIPT, [folder, json.dumps(PROMPTS), new_tokens], cwd=tmp, env=env
            )
        ref_ids = tok(PROMPTS[1])["input_ids"] + list(range(1000, 1000 + new_tokens))
        if reference and reference_available():
            pth = Path(ckpt)
            if pth.suffix != ".pth":
                pth = tmp / "reference.pth"
                export_checkpoint(folder, pth, log=lambda s: None)
            ref_job = pool.submit(run_reference, pth, ref_ids, conv.spec.version)

        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        log(f"[3/5] loaded (installed): {type(tok).__name__}, {type(model).__name__}")
        batch = _greedy(model, tok, PROMPTS, new_tokens)
        single = [_greedy(model, tok, [p], new_tokens)[0] for p in PROMPTS]
        report.batch_equals_single = batch == single
        report.completions = [tok.decode(r) for r in batch]
        log(f"      3 prompts as one left-padded batch, {new_tokens} greedy tokens each: "
            f"batch == one by one: {report.batch_equals_single}")

        if remote_job is not None:
            proc = remote_job.result()
            if proc.returncode != 0:
                raise RuntimeError("the trust_remote_code load failed:\n" + proc.stderr[-2000:])
            result = json.loads(proc.stdout.strip().splitlines()[-1])
            report.remote_classes = result["classes"]
            report.remote_equals_installed = result["tokens"] == batch
            log(f"[4/5] loaded with trust_remote_code=True in a Python where rwkv_hf cannot be imported "
                f"({result['classes'][1]}): same tokens: {report.remote_equals_installed}")
        else:
            log("[4/5] skipped the trust_remote_code check")

        if ref_job is not None:
            ref = ref_job.result()["logits"]
            with torch.no_grad():
                ours = model(torch.tensor([ref_ids])).logits[0].float()
            report.reference_rel_diff = float((ours - ref).abs().max() / ref.abs().max())
            log(f"[5/5] logits vs BlinkDL's rwkv package over {len(ref_ids)} tokens: max |diff| / max |logit| = "
                f"{report.reference_rel_diff:.2e}")
        else:
            report.reference_note = "the reference package `rwkv` is not installed" if reference else "skipped"
            log(f"[5/5] logits vs reference: {report.reference_note}")
        pool.shutdown()
        report.seconds = time.time() - start
    return report


def format_report(r: DemoReport) -> str:
    lines = ["", "rwkv-hf demo report", "-------------------", f"model: {r.summary}"]
    if r.synthetic:
        lines.append("NOTE: the weights are random, so the generated text below is noise; the point is that every check passes.")
    for p, c in zip(r.prompts, r.completions):
        lines.append(f"  {p!r} -> {c!r}")
    lines.append(f"batched generation == one prompt at a time: {r.batch_equals_single}")
    if r.remote_equals_installed is not None:
        lines.append(f"trust_remote_code (no rwkv_hf) == installed: {r.remote_equals_installed}")
    else:
        lines.append("trust_remote_code (no rwkv_hf) == installed: skipped")
    if r.reference_rel_diff is not None:
        lines.append(f"logits vs BlinkDL's reference: max rel diff {r.reference_rel_diff:.2e} (limit 1e-4)")
    else:
        lines.append(f"logits vs BlinkDL's reference: not checked ({r.reference_note})")
    if not r.ok:
        verdict = "SOME CHECKS FAILED"
    elif r.skipped:
        verdict = f"CHECKS PASSED, {len(r.skipped)} skipped ({', '.join(r.skipped)})"
    else:
        verdict = "ALL CHECKS PASSED"
    lines.append(f"{verdict} in {r.seconds:.0f}s")
    return "\n".join(lines)


__all__ = ["DemoReport", "format_report", "run_demo"]
