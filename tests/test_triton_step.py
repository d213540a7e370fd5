"""The Triton decode steps (`rwkv_triton`: every version) on the CPU, through Triton's interpreter.

TRITON_INTERPRET=1 must be set before the kernels are defined, so the step runs in a fresh interpreter
(`run_without_rwkv_hf`'s way: a script and its JSON answer). There the same kernels the GPU runs are
checked against the plain decode step (`rwkv_decode.model_step`, the equations of `modeling_rwkv7`)
and against BlinkDL's reference package on the same checkpoint. The GPU tests (`test_gpu.py`) check
them compiled, inside a captured graph, at the 1.5B's width, every version (`triton_decode` None picks
each one's Triton step on CUDA).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rwkv_hf.testing import make_state_dict, run_reference

pytest.importorskip("triton")
needs_reference = pytest.mark.usefixtures("reference_package")

# both scripts' start: argv = checkpoint, tokens (row 0's; the other rows random), prompt (where the
# Triton step takes over), batch, LORA_APART_FROM
HEADER = r"""
import json, sys
import torch
from rwkv_hf.modeling import rwkv_triton
from rwkv_hf.modeling.rwkv_triton import make_plan, triton_step
from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD, map_tensors
from rwkv_hf.testing import build_model

ckpt, tokens, prompt, batch = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
rwkv_triton.LORA_APART_FROM = int(sys.argv[5])
sd = torch.load(ckpt, weights_only=True)
ids = torch.tensor([tokens] * batch)
ids[1:] = torch.randint(0, 65536, ids[1:].shape, generator=torch.Generator().manual_seed(1))
flat = lambda s: [t for part in s for t in (part if isinstance(part, tuple) else (part,))]  # (v4: (aa, bb, pp))
res = {}
"""

SCRIPT = HEADER + r"""
from rwkv_hf.modeling.rwkv_decode import model_step
from rwkv_hf.modeling.rwkv_paths import Path
for dtype in (torch.float32, torch.bfloat16):
    m = build_model(sd).to(dtype).eval()
    with torch.no_grad():
        cache = getattr(m(ids[:, :prompt], use_cache=True), CACHE_FIELD)
        states = [map_tensors(lambda t: t.clone(), s) for s in cache.layers_state]
        plan = make_plan(m)
        plain, fast = [], []
        for t in range(prompt, ids.shape[1]):
            plain.append(model_step(m, ids[:, t:t + 1], cache, Path("step", "recurrent")).float())
            fast.append(triton_step(m, ids[:, t:t + 1], states, plan).float())
    name = str(dtype).split(".")[-1]
    res[name] = {"plain": torch.stack(plain).tolist(), "fast": torch.stack(fast).tolist(),
                 "state_err": max(float((a.float() - b.float()).abs().max()) for s1, s2 in zip(cache.layers_state, states)
                                  for a, b in zip(flat(s1), flat(s2)))}
print(json.dumps(res))
"""


@needs_reference
@pytest.mark.parametrize("version,batch", [("7", 1), ("7", 5), ("6", 5), ("5.2", 5), ("5.0", 5), ("4", 5)])
def test_triton_step_matches_plain_step_and_reference(tmp_path, version, batch):
    """Two Triton steps after a 4-token prompt (our prefill), rows 1.. of the batch random: in fp32 the
    logits match the plain step's and the reference package's to 1e-5 x max|logit|, the state the plain
    step's; in bf16 they are no further from the fp32 plain step than twice the bf16 plain step is.
    RWKV-7 at batch 5 computes its second LoRA stages apart (LORA_APART_FROM 2 here), at batch 1 in
    `_wkv7_head`."""
    sd = make_state_dict(version, n_layer=2, n_embd=128, head_size=64, seed=21)
    ckpt = tmp_path / f"rwkv{version}.pth"
    torch.save(sd, ckpt)
    tokens = torch.randint(1, 65536, (6,), generator=torch.Generator().manual_seed(8)).tolist()
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(ckpt), json.dumps(tokens), "4", str(batch), "2"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    plain32, fast32 = torch.tensor(res["float32"]["plain"]), torch.tensor(res["float32"]["fast"])
    scale = plain32.abs().amax(-1)
    err = lambda x: float(((x - plain32).abs().amax(-1) / scale).max())  # noqa: E731
    assert err(fast32) <= 1e-5
    assert res["float32"]["state_err"] <= 1e-5
    ref = run_reference(ckpt, tokens, version)["logits"][4:]  # row 0's tokens, the reference's own recurrence
    assert float(((fast32[:, 0] - ref).abs().amax(-1) / ref.abs().amax(-1)).max()) <= 1e-5
    e_plain16, e_fast16 = err(torch.tensor(res["bfloat16"]["plain"])), err(torch.tensor(res["bfloat16"]["fast"]))
    assert e_fast16 <= 2 * e_plain16 + 1e-2, (e_fast16, e_plain16)


PROMPT_SCRIPT = HEADER + r"""
for dtype in (torch.float32, torch.bfloat16):
    m = build_model(sd).to(dtype).eval()
    plan = make_plan(m)
    name = str(dtype).split(".")[-1]
    # padding (with 2 rows or more): row 1 left-padded by 2, row 2 with a zero in the middle
    pad = torch.ones_like(ids, dtype=torch.bool)
    pad[1:2, :2] = False
    pad[2:3, 3] = False
    for masked in (False, True) if batch > 1 else (False,):
        mask = pad if masked else None
        cut = lambda part: None if mask is None else mask[:, part]  # noqa: E731
        with torch.no_grad():
            whole = m(ids, attention_mask=mask, use_cache=True, wkv_mode="recurrent")
            want = getattr(whole, CACHE_FIELD).layers_state
            # all at once from the starting state; the rest continuing the first `prompt` tokens' state
            zero = [blk.zero_state(batch, "cpu", dtype) for blk in m.model.blocks]
            head = getattr(m(ids[:, :prompt], attention_mask=cut(slice(0, prompt)), use_cache=True, wkv_mode="recurrent"),
                           CACHE_FIELD).layers_state
            rest = [map_tensors(lambda t: t.clone(), s) for s in head]
            for how, states, part in (("all", zero, slice(0, None)), ("rest", rest, slice(prompt, None))):
                logits = triton_step(m, ids[:, part], states, plan, mask=cut(part)).float()
                state_err = max(float((a.float() - b.float()).abs().max() / max(1.0, a.float().abs().max()))
                                for s1, s2 in zip(want, states) for a, b in zip(flat(s1), flat(s2)))
                res[f"{name} {how}" + (" padded" if masked else "")] = {
                    "plain": whole.logits[:, -1].float().tolist(), "fast": logits.tolist(), "state_err": state_err}
print(json.dumps(res))
"""


@needs_reference
@pytest.mark.parametrize("version,batch,apart", [("7", 1, 1000), ("7", 3, 2), ("6", 3, 2), ("5.2", 2, 2), ("5.0", 2, 2),
                                                 ("4", 3, 2)])
def test_triton_step_takes_a_prompt_at_once(tmp_path, version, batch, apart):
    """The Triton step with T tokens a row (a prompt: each launch takes every row's tokens, the
    recurrences in turn): 6 tokens from the starting state, and the last 4 after the modules took
    the first 2, against the modules' recurrence over all 6; with 2 rows or more also with padding
    (row 1 left-padded by 2, row 2 a zero inside), against the modules with that attention mask. In
    fp32 the last logits match to 1e-5 x max|logit| (row 0: also the reference package's) and the
    state to 1e-5 x max(1, max|state|); in bf16 they are no further from fp32 than twice the modules'
    bf16 logits are. RWKV-7 with its second LoRA stages in `_wkv7_head` (apart 1000) and apart (2)."""
    sd = make_state_dict(version, n_layer=2, n_embd=128, head_size=64, seed=23)
    ckpt = tmp_path / f"rwkv{version}.pth"
    torch.save(sd, ckpt)
    tokens = torch.randint(1, 65536, (6,), generator=torch.Generator().manual_seed(9)).tolist()
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", PROMPT_SCRIPT, str(ckpt), json.dumps(tokens), "2", str(batch), str(apart)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    ref = run_reference(ckpt, tokens, version)["logits"][-1]
    assert len(res) == (8 if batch > 1 else 4)
    for how in sorted({k.split(" ", 1)[1] for k in res}):
        plain32, fast32 = torch.tensor(res[f"float32 {how}"]["plain"]), torch.tensor(res[f"float32 {how}"]["fast"])
        err = lambda x: float(((x - plain32).abs().amax(-1) / plain32.abs().amax(-1)).max())  # noqa: E731
        assert err(fast32) <= 1e-5, (how, err(fast32))
        assert res[f"float32 {how}"]["state_err"] <= 1e-5, (how, res[f"float32 {how}"]["state_err"])
        assert float((fast32[0] - ref).abs().max() / ref.abs().max()) <= 1e-5
        b16 = res[f"bfloat16 {how}"]
        e_plain16, e_fast16 = err(torch.tensor(b16["plain"])), err(torch.tensor(b16["fast"]))
        assert e_fast16 <= 2 * e_plain16 + 1e-2, (how, e_fast16, e_plain16)


ROUTE_SCRIPT = r"""
import json, sys
import torch
from rwkv_hf.modeling import RwkvCache, rwkv_common, rwkv_paths, rwkv_triton
from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD
from rwkv_hf.testing import build_model, make_state_dict

# the captured Triton step's path, as pick_path gives it on CUDA, here on the CPU (runner "step")
real_pick, real_step, on, calls = rwkv_common.pick_path, rwkv_triton.triton_step, [True], []
def pick(*a, **k):
    path = real_pick(*a, **k)
    return path._replace(triton=True) if k.get("step") and on[0] else path
rwkv_common.pick_path = pick
from rwkv_hf.modeling import rwkv_decode
rwkv_decode.triton_step = lambda m, ids, *a: calls.append(list(ids.shape)) or real_step(m, ids, *a)
m = build_model(make_state_dict("7", n_layer=2, n_embd=128, head_size=64, vocab_size=512, seed=5)).eval()
g = torch.Generator().manual_seed(2)
ids, more = torch.randint(1, 512, (2, 9), generator=g), torch.randint(1, 512, (2, 4), generator=g)
n, res = len(m.model.blocks), {}
err = lambda a, b: float((a.float() - b.float()).abs().max() / b.float().abs().max())
def modules(*a, **k):  # the recurrence through the modules, the step left out
    on[0] = False
    try:
        return m(*a, use_cache=True, wkv_mode="recurrent", logits_to_keep=1, **k)
    finally:
        on[0] = True
with torch.no_grad():
    fast = m(ids, use_cache=True, logits_to_keep=1)
    plain = modules(ids)
    res["calls"] = list(calls)
    res["logits"] = err(fast.logits, plain.logits)
    states = zip(getattr(fast, CACHE_FIELD).layers_state, getattr(plain, CACHE_FIELD).layers_state)
    res["state"] = max(err(a, b) for sa, sb in states for a, b in zip(sa, sb))
    res["seen"] = getattr(fast, CACHE_FIELD).get_seq_length()
    cont = m(more, cache=getattr(fast, CACHE_FIELD), use_cache=True, logits_to_keep=1)
    res["continued"] = err(cont.logits, modules(more, cache=getattr(plain, CACHE_FIELD)).logits)
    res["calls"] = list(calls)
    calls.clear()
    pad = torch.ones_like(ids)
    pad[0, :2] = 0  # left padding: the Triton step
    pad[1, 4] = 0
    res["padded"] = err(m(ids, use_cache=True, attention_mask=pad, logits_to_keep=1).logits,
                        modules(ids, attention_mask=pad).logits)
    res["padded_calls"] = list(calls)
    calls.clear()
    right = torch.ones_like(ids)
    right[1, -2:] = 0  # a row ending in padding: the modules
    m(ids, use_cache=True, attention_mask=right, logits_to_keep=1)
    m(torch.randint(1, 512, (1, rwkv_paths.TRITON_PROMPT_MAX + 1), generator=g), use_cache=True, logits_to_keep=1)
    m(ids, use_cache=True, position_ids=torch.arange(9).expand(2, 9), logits_to_keep=1)
    m(ids, use_cache=True, logits_to_keep=2)
    m(ids, use_cache=False, logits_to_keep=1)
    on[0] = False
    m(ids, use_cache=True, logits_to_keep=1)
    res["modules_calls"] = list(calls)
    on[0] = True
    out = m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)
    res["generate_calls"] = list(calls)
    on[0] = False
    res["generate_same"] = bool(torch.equal(out, m.generate(ids, max_new_tokens=5, do_sample=False, pad_token_id=0)))
    on[0] = True
    # a Triton that cannot build the prompt's kernels: the first prompt of a process says so, keeps the
    # state as it was and goes through the modules, and so do the prompts after it
    import warnings
    def broken(m, ids, *a):
        calls.append(list(ids.shape))
        raise RuntimeError("no kernel for this card")
    rwkv_decode.triton_step = broken
    res["fallback"] = []
    for start in ("full", "empty"):
        rwkv_decode._PROMPT_RAN, rwkv_paths._TRITON_PROMPT_FAILED = set(), False
        calls.clear()
        held = getattr(plain, CACHE_FIELD).clone() if start == "full" else None
        fed = held.get_seq_length() if held else 0
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            got = m(more if held else ids, cache=held, use_cache=True, logits_to_keep=1)
            again = m(more if held else ids, cache=held and getattr(plain, CACHE_FIELD).clone(), use_cache=True,
                      logits_to_keep=1)
        want = modules(more, cache=getattr(plain, CACHE_FIELD).clone()) if held else modules(ids)
        res["fallback"].append({"calls": list(calls), "warned": sum("no kernel" in str(w.message) for w in caught),
                                "err": max(err(got.logits, want.logits), err(again.logits, want.logits)),
                                "seen": getattr(got, CACHE_FIELD).get_seq_length() - fed})
print(json.dumps(res))
"""


def test_forward_sends_a_short_prompt_to_the_triton_step():
    """Where the decode step is the captured Triton one (made to say so here, on the CPU), a forward
    pass of up to TRITON_PROMPT_MAX tokens a row with a cache and the last logits asked for runs the
    Triton step once with all of them: from a fresh cache and continuing one, the logits and state are
    the modules' recurrence (fp32, 1e-5), also left-padded and with a zero inside a row, and generate()
    prefills that way with the same tokens. A row ending in padding, packed documents, a longer
    prompt, more logits, no cache, or a step that is not Triton's keep the modules. A step that fails on the first prompt of a process (from a full cache and from
    none) warns once, leaves the state as it was, and the modules take that prompt and the next."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", ROUTE_SCRIPT], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert res["calls"] == [[2, 9], [2, 4]], res
    assert res["logits"] <= 1e-5 and res["state"] <= 1e-5 and res["continued"] <= 1e-5, res
    assert res["seen"] == 9
    assert res["modules_calls"] == [], res
    assert res["padded"] <= 1e-5 and res["padded_calls"] == [[2, 9]], res
    assert res["generate_calls"] == [[2, 9]], res  # (the steps after it: the plain step, runner "step" here)
    assert res["generate_same"]
    for case, seen in zip(res["fallback"], (4, 9)):  # (tokens the modules fed)
        assert case["calls"] == [case["calls"][0]] and case["warned"] == 1, res["fallback"]
        assert case["err"] <= 1e-5 and case["seen"] == seen, res["fallback"]


def test_prompt_width_rounds_up_to_a_power_of_two(monkeypatch):
    """`rwkv_decode.prompt_width`, the width of the captured step a prompt goes through on CUDA: its
    length rounded up to a power of two; uncaptured (None) where the rounded rows would exceed
    TRITON_PROMPT_ROWS, or with PROMPT_GRAPHS off. (The captured step itself: tests/test_gpu.py.)"""
    from rwkv_hf.modeling import rwkv_decode, rwkv_paths

    monkeypatch.setattr(rwkv_paths, "TRITON_PROMPT_ROWS", 1024)
    assert [rwkv_decode.prompt_width(1, t) for t in (1, 2, 3, 5, 16, 17, 64)] == [1, 2, 4, 8, 16, 32, 64]
    assert rwkv_decode.prompt_width(32, 32) == 32
    assert rwkv_decode.prompt_width(20, 40) is None  # (800 rows, 1,280 rounded up)
    monkeypatch.setattr(rwkv_decode, "PROMPT_GRAPHS", False)
    assert rwkv_decode.prompt_width(1, 5) is None


GEMV_SCRIPT = r"""
import json
import torch
from rwkv_hf.modeling import rwkv_triton as rt

g = torch.Generator().manual_seed(3)
res = {}
for K in (640, 128):  # 640: K split in three slices (256, 256, 128); 128: one slice
    B, N = 3, 96
    x, w = torch.randn(B, K, generator=g), torch.randn(N, K, generator=g) / K**0.5
    mul, base = torch.rand(B, N, generator=g), torch.randn(B, N, generator=g)
    meta = rt.segment_table([(N, 0, 0, rt.ACT_NONE, 0)], K, "cpu")
    out = base.clone()
    rt._gemv_call(x, out, meta, [w], N, accumulate=True, multiply=mul)
    want = base + mul * (x.double() @ w.double().T).float()
    counts = [c for key, (part, c) in rt._SCRATCH.items() if key[2] == N]
    res[K] = {"err": float((out - want).abs().max()), "counts_zero": all(bool((c == 0).all()) for c in counts),
              "scratch": len(counts)}
print(json.dumps(res))
"""


def test_gemv_split_k_sums_every_slice_once():
    """`_gemv` with K split (the path the GPU tunes for one-segment products; interpreted, products of
    256 or more inputs take it): x [3, 640] by W [96, 640] in three slices, multiplied by a given
    [3, 96] and added to the output, equals the fp64 product's to 1e-4, as one slice of 128 does; the
    per-tile counts are back to zero after the launch (the next launch, or the next replay of a
    captured graph, starts from zero)."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", GEMV_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    for K in ("640", "128"):
        assert res[K]["err"] <= 1e-4, res
        assert res[K]["counts_zero"] and res[K]["scratch"] >= 1, res


ROWS_SCRIPT = r"""
import json
import torch
from rwkv_hf.modeling import rwkv_triton as rt

g = torch.Generator().manual_seed(4)
res = {}
K, N, D, Ks = 640, 96, 40, 200
x = torch.randn(1, 2, K, generator=g)
w, lora = torch.randn(N, K, generator=g) / K**0.5, torch.randn(Ks, D, generator=g) / Ks**0.5
# two segments: tanh(x0 W^T) at 0 (layout 0), x1[:Ks] L at N (layout 1, its own depth Ks < K)
meta = rt.segment_table([(N, 0, 0, rt.ACT_TANH, 0), (D, 1, N, rt.ACT_NONE, 1, Ks)], K, "cpu")
out = torch.zeros(1, N + D)
rt._gemv_call(x, out, meta, [w, lora], N)
xd = x.double()
want = torch.cat([torch.tanh(xd[:, 0] @ w.double().T), xd[:, 1, :Ks] @ lora.double()], -1).float()
res["segments"] = float((out - want).abs().max())
# the same with the programs in the segments' order (interpreted, a launch of several segments starts
# from the last one's where SEGMENTS_REVERSED is set, as the default is)
rt.SEGMENTS_REVERSED = not rt.SEGMENTS_REVERSED
out = torch.zeros(1, N + D)
rt._gemv_call(x, out, meta, [w, lora], N)
res["segments_other_order"] = float((out - want).abs().max())
rt.SEGMENTS_REVERSED = not rt.SEGMENTS_REVERSED
# one segment, multiplied and added (the channel mix's value)
mul, base = torch.rand(1, N, generator=g), torch.randn(1, N, generator=g)
out = base.clone()
rt._gemv_call(x[:, 0], out, rt.segment_table([(N, 0, 0, rt.ACT_NONE, 0)], K, "cpu"), [w], N, accumulate=True,
              multiply=mul)
res["accumulate"] = float((out - (base + mul * (xd[:, 0] @ w.double().T)).float()).abs().max())
# the same launches, one row of three: `_gemv` (the tensor-core tiles) gives the same sums
x3 = torch.cat([x, torch.randn(2, 2, K, generator=g)])
out3 = torch.zeros(3, N + D)
rt._gemv_call(x3, out3, meta, [w, lora], N)
res["rows_vs_gemv"] = float((out3[:1] - want).abs().max())
print(json.dumps(res))
"""


def test_gemv_rows_matches_the_product():
    """`_gemv_rows` (one row of x, whole rows of W without tensor cores; interpreted, `_gemv_call` sends
    every one-row launch to it): two segments, tanh of a [96, 640] nn.Linear-layout product and a
    [200, 40] input-major LoRA matrix of depth 200 < K, both within 1e-5 of the fp64 products whichever
    segment's programs start first (`SEGMENTS_REVERSED`), and one
    segment multiplied by a given vector and added to the output; `_gemv`'s tiles, the same launch on
    three rows, agree on row 0 to 1e-5."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", ROWS_SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    assert max(res.values()) <= 1e-5, res
