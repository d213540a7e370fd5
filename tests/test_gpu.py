"""GPU tests: flash-linear-attention kernels, the chunked form and the graph decoder against the recurrence.

They skip without CUDA (CI), and the fla ones also without flash-linear-attention. Run on a GPU with
`pytest -q tests/test_gpu.py -s` (the -s shows the measured errors).

Tolerances, and why:
- op level, fp32 inputs: fla's Triton kernels run their matrix products in tf32 (10-bit mantissa),
  so the relative error ||fla - rec|| / ||rec|| lands near 1e-3; we allow 1e-2.
- op level, bf16 inputs: both sides see the same bf16-rounded inputs, the recurrence upcasts them to
  fp32, fla keeps bf16 operands in its products: relative error ~1e-2; we allow 3e-2.
- model level, bf16 weights: the error of the fla path against an fp32 recurrent run must stay within
  twice the error that the bf16 recurrent run itself makes against that fp32 run (plus 1% of the
  logit range): the fast path may not add more noise than bf16 arithmetic already brings.
"""

from __future__ import annotations

import time

import pytest
import torch

from rwkv_hf.modeling.rwkv_ops import wkv5_recurrent, wkv7_recurrent
from rwkv_hf.testing import transformers_generate_loop

CUDA = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")

try:
    from rwkv_hf.modeling.rwkv_fla import HAVE_FLA
except ImportError:  # pragma: no cover
    HAVE_FLA = False
needs_fla = pytest.mark.skipif(not HAVE_FLA, reason="needs flash-linear-attention")

DEV = "cuda"


def rel(a: torch.Tensor, b: torch.Tensor, mask=None) -> float:
    a, b = a.double(), b.double()
    if mask is not None:
        a, b = a[mask], b[mask]
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def make_mask(B, T, g):
    """Row 0 full, row 1 left-padded, others with zeros at the start and in the middle."""
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, : T // 3] = False
    for b in range(2, B):
        mask[b, : int(torch.randint(0, T // 4 + 1, (1,), generator=g))] = False
        s = int(torch.randint(T // 4, T // 2, (1,), generator=g))
        mask[b, s : s + T // 8] = False
    return mask.to(DEV)


def v5_inputs(B, T, H, N, g, dtype):
    r, k, v = (torch.randn(B, T, H, N, generator=g) * 0.5 for _ in range(3))
    log_w = -torch.exp(torch.rand(B, T, H, N, generator=g) * 6 - 5)  # w in (exp(-e), exp(-e^-5)) as in v6
    u = torch.randn(H, N, generator=g) * 0.5
    S = torch.randn(B, H, N, N, generator=g) * 0.3
    return [x.to(DEV, dtype) for x in (r, k, v)] + [log_w.to(DEV), u.to(DEV), S.to(DEV)]


def v7_inputs(B, T, H, N, g, dtype):
    r, k, v = (torch.randn(B, T, H, N, generator=g) * 0.5 for _ in range(3))
    log_w = -0.606531 * torch.sigmoid(torch.randn(B, T, H, N, generator=g) * 2)
    kk = torch.nn.functional.normalize(torch.randn(B, T, H, N, generator=g), dim=-1)
    rate = torch.sigmoid(torch.randn(B, T, H, N, generator=g))
    a, b = -kk, kk * rate
    S = torch.randn(B, H, N, N, generator=g) * 0.3
    return [x.to(DEV, dtype) for x in (r,)] + [log_w.to(DEV)] + [x.to(DEV, dtype) for x in (k, v, a, b)] + [S.to(DEV)]


CASES = [  # (T, with initial state, with mask)
    (1, True, False),
    (37, False, False),
    (100, True, False),
    (200, True, True),
    (64, False, True),
]


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,init,masked", CASES)
def test_wkv5_fla_matches_recurrent(T, init, masked, dtype):
    from rwkv_hf.modeling.rwkv_fla import wkv5_fla

    g = torch.Generator().manual_seed(T * 7 + init + 2 * masked)
    B, H, N = 3, 2, 64
    r, k, v, log_w, u, S = v5_inputs(B, T, H, N, g, dtype)
    S = S if init else torch.zeros_like(S)
    mask = make_mask(B, T, g) if masked else None
    out, S1 = wkv5_fla(r, k, v, log_w, u, S, mask)
    ref, S1_ref = wkv5_recurrent(r, k, v, log_w, u, S, mask)
    tol = 1e-2 if dtype == torch.float32 else 3e-2
    m = None if mask is None else mask
    e_out, e_state = rel(out, ref, m), rel(S1, S1_ref)
    print(f"\nwkv5 fla {dtype} T={T} init={init} mask={masked}: out {e_out:.2e} state {e_state:.2e}")
    assert out.dtype == torch.float32 and S1.dtype == torch.float32 and S1.shape == S.shape
    assert torch.isfinite(out).all() and torch.isfinite(S1).all()
    assert e_out < tol and e_state < tol


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("T,init,masked", CASES)
def test_wkv7_fla_matches_recurrent(T, init, masked, dtype):
    from rwkv_hf.modeling.rwkv_fla import wkv7_fla

    g = torch.Generator().manual_seed(T * 11 + init + 2 * masked)
    B, H, N = 3, 2, 64
    r, log_w, k, v, a, b, S = v7_inputs(B, T, H, N, g, dtype)
    S = S if init else torch.zeros_like(S)
    mask = make_mask(B, T, g) if masked else None
    out, S1 = wkv7_fla(r, log_w, k, v, a, b, S, mask)
    ref, S1_ref = wkv7_recurrent(r, log_w, k, v, a, b, S, mask)
    tol = 1e-2 if dtype == torch.float32 else 3e-2
    e_out, e_state = rel(out, ref, mask), rel(S1, S1_ref)
    print(f"\nwkv7 fla {dtype} T={T} init={init} mask={masked}: out {e_out:.2e} state {e_state:.2e}")
    assert out.dtype == torch.float32 and S1.dtype == torch.float32 and S1.shape == S.shape
    assert torch.isfinite(out).all() and torch.isfinite(S1).all()
    assert e_out < tol and e_state < tol


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv5_one_token_fused_kernel_matches_recurrent(dtype):
    """v5.x/v6 decode step through fla's fused_recurrent_rwkv6, five chained steps, data-dependent (v6)
    and constant (v5) decays. fp32 inside both; fla returns the output in fp32, so it and the state agree
    to summation order."""
    from rwkv_hf.modeling.rwkv_fla import wkv5_fla_step

    g = torch.Generator().manual_seed(13)
    for constant_decay in (False, True):
        S_fused = S_ref = None
        for step in range(5):
            r, k, v, log_w, u, S0 = v5_inputs(3, 1, 2, 64, g, dtype)
            if constant_decay:
                log_w = log_w[0, 0]  # [H, N], as v5 passes it
            if S_fused is None:
                S_fused = S_ref = S0
            with torch.no_grad():
                out, S_fused = wkv5_fla_step(r, k, v, log_w, u, S_fused)
                ref, S_ref = wkv5_recurrent(r, k, v, log_w, u, S_ref)
            tol = 1e-5 if dtype == torch.float32 else 1e-2
            assert out.dtype == torch.float32 and S_fused.shape == S_ref.shape
            assert rel(out, ref) < tol and rel(S_fused, S_ref) < 1e-5, (constant_decay, step, rel(out, ref), rel(S_fused, S_ref))


@needs_fla
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_wkv7_one_token_fused_kernel_matches_recurrent(dtype):
    """The decode step's fused kernel (fla's fused_recurrent_rwkv7), five steps chained through its
    transposed-view state. Both sides compute in fp32 from the same inputs (no tf32 in an elementwise
    recurrence), so the states agree to summation order (1e-5); fla writes the output in the inputs'
    dtype, so with bf16 inputs the output carries bf16 rounding (2^-8 relative; measured 1.7e-3), as the
    model's next op (y.to(x.dtype)) does to the recurrence's fp32 output anyway."""
    from rwkv_hf.modeling.rwkv_fla import wkv7_fla_step

    g = torch.Generator().manual_seed(12)
    S_fused = S_ref = None
    for step in range(5):
        r, log_w, k, v, a, b, S0 = v7_inputs(3, 1, 2, 64, g, dtype)
        if S_fused is None:
            S_fused = S_ref = S0
        with torch.no_grad():
            out, S_fused = wkv7_fla_step(r, log_w, k, v, a, b, S_fused)
            ref, S_ref = wkv7_recurrent(r, log_w, k, v, a, b, S_ref)
        assert out.dtype == torch.float32 and S_fused.shape == S_ref.shape
        tol_out = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel(out, ref) < tol_out and rel(S_fused, S_ref) < 1e-5, (step, rel(out, ref), rel(S_fused, S_ref))


# ------------------------------------------------------------------------------------- whole models
def build(version, dtype, n_layer=2, n_embd=256, seed=0, compile_decode=False, triton_decode=False):
    """A random model on the card. `compile_decode` and `triton_decode` False (here; the config's
    defaults are None: on CUDA the captured step is RWKV-7's Triton step, else compiled): the graph
    tests check the eager captured step, which is the eager path bit for bit; the tests of the
    compiled and Triton steps ask for them."""
    import rwkv_hf.modeling as M
    from rwkv_hf.convert.blinkdl import config_from_state_dict, to_hf_key
    from rwkv_hf.testing import make_state_dict

    sd = make_state_dict(version, n_layer=n_layer, n_embd=n_embd, head_size=64, seed=seed)
    spec, cfg = config_from_state_dict(sd)
    m = M.FAMILIES[spec.family][2](cfg)
    m.load_state_dict({to_hf_key(k): v for k, v in sd.items()})
    m.config.compile_decode, m.config.triton_decode = compile_decode, triton_decode
    return m.to(DEV, dtype).eval()


def logits(m, ids, mode, mask=None):
    with torch.no_grad():
        return m(input_ids=ids, attention_mask=mask, wkv_mode=mode, use_cache=False).logits.float()


@needs_fla
@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_model_fla_matches_recurrent(version):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 65536, (2, 150), generator=g).to(DEV)
    m32 = build(version, torch.float32)
    ref = logits(m32, ids, "recurrent")
    scale = float(ref.abs().max())
    e32 = float((logits(m32, ids, "auto") - ref).abs().max()) / scale
    m16 = build(version, torch.bfloat16)
    e_bf16_rec = float((logits(m16, ids, "recurrent") - ref).abs().max()) / scale
    e_bf16_fla = float((logits(m16, ids, "auto") - ref).abs().max()) / scale
    print(
        f"\nmodel v{version}: fp32 fla vs rec {e32:.2e}; bf16 rec vs fp32 {e_bf16_rec:.2e}; "
        f"bf16 fla vs fp32 {e_bf16_fla:.2e} (of max|logit| {scale:.1f})"
    )
    assert e32 < 5e-3
    assert e_bf16_fla <= 2 * e_bf16_rec + 1e-2


@needs_fla
@pytest.mark.parametrize("version", ["5.2", "6", "7"])
def test_left_padded_batch_fla_equals_rows_alone(version):
    g = torch.Generator().manual_seed(2)
    m = build(version, torch.float32)
    lens, T = [150, 97, 40], 150
    rows = [torch.randint(0, 65536, (n,), generator=g) for n in lens]
    ids = torch.zeros(len(lens), T, dtype=torch.long)
    mask = torch.zeros(len(lens), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, T - len(r) :] = r
        mask[i, T - len(r) :] = 1
    out = logits(m, ids.to(DEV), "auto", mask.to(DEV))
    worst = 0.0
    for i, r in enumerate(rows):
        alone = logits(m, r[None].to(DEV), "auto")[0]
        worst = max(worst, float((out[i, T - len(r) :] - alone).abs().max()) / float(alone.abs().max()))
    print(f"\nleft-padded v{version} fla: max rel diff to rows alone {worst:.2e}")
    assert worst < 2e-3


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_model_chunk_matches_recurrent_on_cuda(version):
    m = build(version, torch.float32)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 65536, (2, 150), generator=g).to(DEV)
    mask = torch.ones(2, 150, dtype=torch.long, device=DEV)
    mask[1, :33] = 0
    ref = logits(m, ids, "recurrent", mask)
    out = logits(m, ids, "chunk", mask)
    keep = mask.bool()
    err = float((out - ref)[keep].abs().max()) / float(ref[keep].abs().max())
    print(f"\nchunk v{version} on CUDA vs recurrent: {err:.2e}")
    assert err < 2e-3  # fp32 on both sides; cuBLAS may use tf32-free fp32 products here


# --------------------------------------------------------------------------------- graph decoding
def prompts(batch: int, seed: int):
    """[batch, 20] random ids and a mask; with a batch, row 1 is left-padded by 7."""
    ids = torch.randint(0, 65536, (batch, 20), generator=torch.Generator().manual_seed(seed)).to(DEV)
    mask = torch.ones_like(ids)
    if batch > 1:
        mask[1, :7] = 0
    return ids, mask


@pytest.mark.parametrize("version", ["5.2", "6", "7"])
@pytest.mark.parametrize("batch", [1, 3])
def test_graph_decoder_gives_eager_greedy_tokens(version, batch):
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder

    m = build(version, torch.bfloat16, n_layer=3)
    ids, mask = prompts(batch, seed=4)
    with torch.no_grad():
        eager = m.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0)
    dec = RwkvGraphDecoder(m, batch_size=batch)
    fast = dec.generate(ids, attention_mask=mask, max_new_tokens=16)
    assert torch.equal(fast, eager[:, ids.shape[1] :]), (fast, eager[:, ids.shape[1] :])


def _teacher_forced(m, decoders, ids, feed=None, steps=16, wkv_mode=None):
    """Logits [steps, B, V] of each decoder from ids' state (the prefill in `wkv_mode`), all fed the
    same tokens: `feed` [steps, B] if given, else the first decoder's greedy tokens. Returns (logits per
    decoder, the tokens fed)."""
    from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD

    with torch.no_grad():
        out = m(input_ids=ids, use_cache=True, logits_to_keep=1, wkv_mode=wkv_mode)
    for dec in decoders:
        dec.load_cache(getattr(out, CACHE_FIELD))
    nxt, got, fed = out.logits[:, -1].argmax(-1), [[] for _ in decoders], []
    for t in range(steps):
        nxt = feed[t] if feed is not None else nxt
        fed.append(nxt)
        for dec, g in zip(decoders, got):
            g.append(dec.step(nxt).float().clone())
        nxt = got[0][-1].argmax(-1)
    return [torch.stack(g) for g in got], torch.stack(fed)


@pytest.mark.parametrize("batch", [1, 5])  # x W^T as a reduction (batch <= 4) and as a matmul
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_fused_decoder_matches_eager(version, batch):
    """The compiled decode step (rwkv_decode, compile_decode) against the eager graph step, 16 teacher-forced steps.
    fp32: the same function, so within 1e-5 x max|logit| and the same greedy tokens. bf16 (fed the
    fp32 run's tokens): its error against the fp32 run may be at most twice the eager bf16 step's own
    (plus 1% of the logit range): fusing may not add more noise than bf16 arithmetic already brings."""
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder

    ids = torch.randint(0, 65536, (batch, 20), generator=torch.Generator().manual_seed(5)).to(DEV)
    m32 = build(version, torch.float32, n_layer=3)
    (eager32, fused32), fed = _teacher_forced(m32, [RwkvGraphDecoder(m32, batch), RwkvGraphDecoder(m32, batch, fused=True)], ids)
    m16 = build(version, torch.bfloat16, n_layer=3)
    dec16 = [RwkvGraphDecoder(m16, batch), RwkvGraphDecoder(m16, batch, fused=True)]
    (eager16, fused16), _ = _teacher_forced(m16, dec16, ids, feed=fed)
    assert dec16[1].fused, "the compiled step fell back to the eager one"
    scale = eager32.abs().amax(-1)
    err = lambda x: float(((x - eager32).abs().amax(-1) / scale).max())  # noqa: E731
    e32, e_eager, e_fused = err(fused32), err(eager16), err(fused16)
    print(f"\nfused v{version} decode b{batch}: fp32 vs eager {e32:.2e}; bf16 eager vs fp32 {e_eager:.2e}, bf16 fused vs fp32 {e_fused:.2e}")
    assert e32 <= 1e-5
    assert torch.equal(fused32.argmax(-1), eager32.argmax(-1))
    assert e_fused <= 2 * e_eager + 1e-2


@pytest.mark.parametrize("batch", [1, 5, 32])
@pytest.mark.parametrize("n_embd", [256, 2048])
@pytest.mark.parametrize("version", ["7", "6", "5.2", "4"])
def test_triton_step_matches_eager(version, n_embd, batch):
    """`_triton_step_against_eager`, its tiles chosen by the step's tuning."""
    _triton_step_against_eager(version, n_embd, batch)


@pytest.mark.parametrize("version", ["7", "6", "5.2", "4"])
def test_triton_step_with_whole_rows_matches_eager(version, monkeypatch):
    """The same at batch 1 with `_gemv_rows` the only tiles the step's tuning may choose, fp32 and bf16
    (left to itself, the tuning takes whichever of the two kernels is faster for each kind of product,
    so the test above may never run one of them)."""
    from rwkv_hf.modeling import rwkv_triton as rt

    monkeypatch.setattr(rt, "_GEMV_CONFIGS", [])
    monkeypatch.setattr(rt, "_SPLIT_CONFIGS", [])
    monkeypatch.setattr(rt, "_CHOSEN", {})
    _triton_step_against_eager(version, 2048, 1)
    assert rt._CHOSEN and all(c.kwargs.get("ROWS") for c in rt._CHOSEN.values()), rt._CHOSEN


@pytest.mark.parametrize("version,batch", [("7", 1), ("6", 5)])
def test_triton_step_with_reversed_segments_matches_eager(version, batch, monkeypatch):
    """The same with every tile the step's tuning may choose reversed (a launch of several segments
    starts its programs from the last segment's: `SEGMENTS_REVERSED`), so that this order runs on the
    GPU whichever the tuning would pick; RWKV-7 at batch 1 (whole rows or tiles, PDL late: `_late`),
    RWKV-6 at batch 5 (tensor-core tiles; its channel mix has two segments)."""
    from rwkv_hf.modeling import rwkv_triton as rt

    def reversed_(configs):
        return [rt.triton.Config(dict(c.kwargs, REVERSED=True), num_warps=c.num_warps, num_stages=c.num_stages)
                for c in configs]

    for name in ("_GEMV_CONFIGS", "_SPLIT_CONFIGS", "_ROWS_CONFIGS"):
        monkeypatch.setattr(rt, name, reversed_(getattr(rt, name)))
    monkeypatch.setattr(rt, "_CHOSEN", {})
    _triton_step_against_eager(version, 2048, batch)
    several = [c for key, c in rt._CHOSEN.items() if key[6] > 1]  # (key[6]: the launch's segments)
    assert several and all(c.kwargs.get("REVERSED") for c in several), rt._CHOSEN


def _triton_step_against_eager(version, n_embd, batch):
    """A version's Triton step (rwkv_triton) against the eager graph step, 16 teacher-forced steps, on the
    bounds of test_fused_decoder_matches_eager: fp32 within 1e-5 x max|logit| with the same greedy
    tokens; bf16 no noisier than twice the eager bf16 step. Width 2048: the 1.5B's LoRA widths and tiles.
    The prefill and the eager step run the plain recurrence (wkv_mode "recurrent"), the truth; it also
    keeps fla's kernels, which tune themselves on first use for each dtype and shape, out of the test
    (with fla's prefill, [7-2048-5] took 126 s on a cold H200, 90 s of it in bf16, and [7-2048-32] did
    not end in 300 s; the Triton step's own first capture in decode_step.py takes about 20 s)."""
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder
    from rwkv_hf.modeling.rwkv_paths import pick_path

    def plain(m):
        path = pick_path(m, DEV, 1, "recurrent", step=True, graph=True, compiled=False, batch=batch, triton=False)
        return RwkvGraphDecoder(m, batch, path=path)

    t0 = time.time()
    ids = torch.randint(0, 65536, (batch, 20), generator=torch.Generator().manual_seed(5)).to(DEV)
    m32 = build(version, torch.float32, n_layer=3, n_embd=n_embd)
    (eager32, fast32), fed = _teacher_forced(m32, [plain(m32), RwkvGraphDecoder(m32, batch, triton=True)], ids,
                                             wkv_mode="recurrent")
    t32 = time.time() - t0
    m16 = build(version, torch.bfloat16, n_layer=3, n_embd=n_embd)
    dec16 = [plain(m16), RwkvGraphDecoder(m16, batch, triton=True)]
    (eager16, fast16), _ = _teacher_forced(m16, dec16, ids, feed=fed, wkv_mode="recurrent")
    t16 = time.time() - t0 - t32
    assert dec16[1].path.triton, "the Triton step fell back to the eager one"
    scale = eager32.abs().amax(-1)
    err = lambda x: float(((x - eager32).abs().amax(-1) / scale).max())  # noqa: E731
    e32, e_eager, e_fast = err(fast32), err(eager16), err(fast16)
    print(f"\nTriton v{version} decode C{n_embd} b{batch}: fp32 vs eager {e32:.2e}; bf16 eager vs fp32 {e_eager:.2e}, "
          f"bf16 Triton vs fp32 {e_fast:.2e} (fp32 part {t32:.0f} s, bf16 part {t16:.0f} s, with building kernels)")
    assert e32 <= 1e-5
    assert torch.equal(fast32.argmax(-1), eager32.argmax(-1))
    assert e_fast <= 2 * e_eager + 1e-2


@pytest.mark.parametrize("version,batch", [("7", 1), ("7", 5), ("6", 5), ("5.2", 3), ("4", 3)])
def test_short_prompt_runs_the_triton_step_at_once(version, batch):
    """With the Triton step on (triton_decode True), a 20-token prompt's forward pass (a cache, the last
    logits; with 2 rows or more, row 1 left-padded) is one Triton step taking all 20 tokens a row: in
    fp32 its logits and state are the modules' recurrence (1e-5) and generate()'s greedy tokens those
    of the modules' and the eager step's; in bf16 its logits are no further from fp32 than twice the
    modules' bf16 logits are. Width 2048: the products as 20 and 100 rows (tiles of 32 and 64 rows)."""
    from rwkv_hf.modeling import rwkv_decode
    from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD

    t0 = time.time()
    ids = torch.randint(0, 65536, (batch, 20), generator=torch.Generator().manual_seed(4)).to(DEV)
    mask = torch.ones_like(ids)
    mask[1:2, :5] = 0  # (with 2 rows or more: row 1 left-padded)
    calls, real = [], rwkv_decode.triton_step
    rwkv_decode.triton_step = lambda m, x, *a: calls.append(tuple(x.shape)) or real(m, x, *a)
    prompts, real_prompt = [], rwkv_decode.RwkvGraphDecoder.prompt
    rwkv_decode.RwkvGraphDecoder.prompt = lambda dec, x, *a: prompts.append(tuple(x.shape)) or real_prompt(dec, x, *a)
    out = {}
    try:
        for dtype in (torch.float32, torch.bfloat16):
            m = build(version, dtype, n_layer=3, n_embd=2048, triton_decode=True)
            with torch.no_grad():
                fast = m(ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
                plain = m(ids, attention_mask=mask, use_cache=True, logits_to_keep=1, wkv_mode="recurrent")
                leaves = [torch.utils._pytree.tree_leaves(getattr(o, CACHE_FIELD).layers_state) for o in (fast, plain)]
                state_err = max(float((a.float() - b.float()).abs().max() / max(1.0, b.float().abs().max()))
                                for a, b in zip(*leaves))
                out[dtype] = fast.logits[:, -1].float(), plain.logits[:, -1].float(), state_err
                if dtype == torch.float32:  # (against the modules' recurrence and the eager step: no fla kernels,
                    # which tune themselves for minutes on a cold card)
                    tokens = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
                    plain_tokens = m.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0,
                                              wkv_mode="recurrent")
                    assert torch.equal(tokens, plain_tokens), (tokens, plain_tokens)
    finally:
        rwkv_decode.triton_step, rwkv_decode.RwkvGraphDecoder.prompt = real, real_prompt
    assert prompts.count((batch, 20)) == 3, prompts  # (fp32, its generate(), bf16; not the recurrent generate())
    # each model's decoder captured the step 32 tokens wide (once run on a copy of the state, once captured)
    assert calls.count((batch, 32)) == 4 and (batch, 20) not in calls, calls
    (fast32, plain32, state32), (fast16, plain16, _) = out[torch.float32], out[torch.bfloat16]
    err = lambda x: float(((x - plain32).abs().amax(-1) / plain32.abs().amax(-1)).max())  # noqa: E731
    print(f"\nTriton v{version} prompt b{batch}: fp32 {err(fast32):.2e} (state {state32:.2e}); bf16 {err(fast16):.2e} "
          f"against the modules' bf16 {err(plain16):.2e} ({time.time() - t0:.0f} s)")
    assert err(fast32) <= 1e-5 and state32 <= 1e-5
    assert err(fast16) <= 2 * err(plain16) + 1e-2


@pytest.mark.parametrize("version", ["7", "4"])
def test_captured_prompt_is_the_uncaptured_step(version, monkeypatch):
    """`RwkvGraphDecoder.prompt`: a prompt through the step captured for its width (T rounded up to a
    power of two, padded on the left) gives the uncaptured Triton step's logits and state, fp32, 3 rows
    (row 1 left-padded): bit for bit at 13 tokens (39 and 48 product rows: the same tiles), within 1e-6
    at 5 (15 and 24 rows) and without a mask; a second prompt of another length replays the same graph."""
    from rwkv_hf.modeling import rwkv_decode
    from rwkv_hf.modeling.rwkv_decode import RwkvGraphDecoder

    m = build(version, torch.float32, n_layer=3, n_embd=256, triton_decode=True)
    dec = RwkvGraphDecoder(m, batch_size=3, triton=True)
    start = dec.export_cache()  # (load_cache copies it into the buffers: it stays as it is)
    g = torch.Generator().manual_seed(8)
    leaves = lambda: torch.utils._pytree.tree_leaves(dec.export_cache().layers_state)  # noqa: E731

    def both(T, masked):
        ids = torch.randint(0, 65536, (3, T), generator=g).to(DEV)
        mask = None
        if masked:
            mask = torch.ones(3, T, dtype=torch.bool, device=DEV)
            mask[1, : T // 3] = False
        out = []
        for graphs in (True, False):
            monkeypatch.setattr(rwkv_decode, "PROMPT_GRAPHS", graphs)
            dec.load_cache(start)
            with torch.no_grad():
                out.append((dec.prompt(ids, mask), leaves()))
        return out

    for T, masked in ((13, True), (5, True), (11, False), (7, False)):
        (a, sa), (b, sb) = both(T, masked)
        err = max([float((a - b).abs().max() / b.abs().max())] + [float((x - y).abs().max()) for x, y in zip(sa, sb)])
        print(f"\nv{version} prompt of {T} ({'masked' if masked else 'no mask'}): captured vs uncaptured {err:.1e}")
        assert (err == 0) if T == 13 else err <= 1e-6, (T, err)
    assert sorted(dec._prompts) == [8, 16]


@pytest.mark.parametrize("version, batch", [("7", 1), ("7", 3), ("6", 3), ("5.2", 3), ("4", 3)])
def test_generate_runs_the_triton_step_by_default_and_gives_eager_tokens(version, batch):
    """triton_decode None (the default), every version: generate() replays the Triton step; fp32 greedy
    and beam-search tokens of a left-padded batch are the eager recurrence's; sampling with a seed
    repeats itself; wkv_mode "recurrent" and triton_decode=False keep the eager captured step. (The
    eager side is wkv_mode "recurrent": on an H200 fla's chunked prefill gives fp32 logits 4e-4 to 6e-4
    of the largest off the recurrence (ours 7e-7), which moved a beam of the v6 model in session 14.)"""
    from rwkv_hf.modeling.rwkv_decode import _DECODERS

    m = build(version, torch.float32, n_layer=3, triton_decode=None)
    ids, mask = prompts(batch, seed=6)
    eager = _greedy(m, ids, mask, graphs=False, wkv_mode="recurrent")
    fast = _greedy(m, ids, mask, graphs=True)
    assert [d.path.triton for d in _DECODERS[m].values()] == [True]
    assert torch.equal(fast, eager), (fast, eager)
    beams = _greedy(m, ids, mask, graphs=True, num_beams=2)
    assert torch.equal(beams, _greedy(m, ids, mask, graphs=False, num_beams=2, wkv_mode="recurrent"))
    def sample():
        torch.manual_seed(3)
        with torch.no_grad():
            return m.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=True, top_k=50, top_p=0.9,
                              temperature=0.8, repetition_penalty=1.1, pad_token_id=0)

    assert torch.equal(sample(), sample())
    for triton_decode, kw in ((None, {"wkv_mode": "recurrent"}), (False, {})):
        _DECODERS[m].clear()
        m.config.triton_decode = triton_decode
        _greedy(m, ids, mask, graphs=True, **kw)
        assert [d.path.triton for d in _DECODERS[m].values()] == [False]


# ------------------------------------------------------------------- generate() through the graphs
def _greedy(m, ids, mask, graphs: bool, **kw):
    m.config.cuda_graph_decode = graphs
    try:
        with torch.no_grad():
            return m.generate(ids, attention_mask=mask, max_new_tokens=16, do_sample=False, pad_token_id=0, **kw)
    finally:
        m.config.cuda_graph_decode = True


@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
@pytest.mark.parametrize("batch", [1, 3])
def test_generate_replays_graphs_and_gives_eager_tokens(version, batch):
    """generate() sends its one-token steps to the captured graph by itself; greedy tokens are eager's."""
    from rwkv_hf.modeling.rwkv_decode import _DECODERS

    m = build(version, torch.bfloat16, n_layer=3)
    ids, mask = prompts(batch, seed=6)
    eager = _greedy(m, ids, mask, graphs=False)
    assert not _DECODERS.get(m)
    fast = _greedy(m, ids, mask, graphs=True)
    assert _DECODERS.get(m), "the graph path was not taken"
    assert torch.equal(fast, eager), (fast, eager)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_generate_compiles_the_captured_step_by_default_and_gives_eager_tokens(version, batch):
    """compile_decode None (the default): generate() replays the compiled step. In fp32 it computes the
    eager function (to ~1e-6), so greedy and beam-search tokens of a left-padded batch are eager's
    exactly; `disable_compile=True` gives the eager captured step for that call."""
    from rwkv_hf.modeling.rwkv_decode import _DECODERS

    m = build(version, torch.float32, n_layer=3, compile_decode=None)
    ids, mask = prompts(batch, seed=6)
    eager = _greedy(m, ids, mask, graphs=False)
    fast = _greedy(m, ids, mask, graphs=True)
    assert [d.fused for d in _DECODERS[m].values()] == [True]
    assert torch.equal(fast, eager), (fast, eager)
    beams = _greedy(m, ids, mask, graphs=True, num_beams=2)
    assert torch.equal(beams, _greedy(m, ids, mask, graphs=False, num_beams=2))
    _DECODERS[m].clear()
    assert torch.equal(_greedy(m, ids, mask, graphs=True, disable_compile=True), eager)
    assert [d.fused for d in _DECODERS[m].values()] == [False]


def test_graph_state_moves_between_caches_without_sharing():
    """Two conversations stepped in turn through one batch-1 decoder, a generate() cache continued
    eagerly, a cloned cache: each must follow its own eager twin exactly."""
    from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD

    m = build("7", torch.bfloat16, n_layer=3)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, 65536, (1, 12), generator=g).to(DEV) for _ in range(2)]
    steps = torch.randint(0, 65536, (6,), generator=g).tolist()

    def run(graphs):
        m.config.cuda_graph_decode = graphs
        out = []
        with torch.no_grad():
            caches = [getattr(m(p, use_cache=True, logits_to_keep=1), CACHE_FIELD) for p in prompts]
            for i, t in enumerate(steps):  # A, B, A, B, ...: the decoder's buffers change hands each step
                c = caches[i % 2]
                out.append(m(torch.tensor([[t]], device=DEV), cache=c, use_cache=True).logits.float())
            branch = caches[0].clone()  # a copy taken while cache 0 holds the buffers
            out.append(m(torch.tensor([[5]], device=DEV), cache=caches[0], use_cache=True).logits.float())
            out.append(m(torch.tensor([[5]], device=DEV), cache=branch, use_cache=True).logits.float())
            m.config.cuda_graph_decode = False  # continue cache 1 eagerly
            out.append(m(torch.tensor([[9]], device=DEV), cache=caches[1], use_cache=True).logits.float())
        m.config.cuda_graph_decode = True
        return out

    eager, graph = run(False), run(True)
    for a, b in zip(graph, eager):
        assert torch.equal(a, b)


def test_graphs_under_inference_mode_then_no_grad():
    """Steps under torch.inference_mode() and later under no_grad (generate()) each get working buffers."""
    from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD

    m = build("5.2", torch.bfloat16, n_layer=2)
    ids = torch.randint(0, 65536, (1, 8), generator=torch.Generator().manual_seed(9)).to(DEV)
    with torch.inference_mode():
        c = getattr(m(ids, use_cache=True, logits_to_keep=1), CACHE_FIELD)
        first = m(ids[:, :1], cache=c, use_cache=True).logits
    eager = _greedy(m, ids, None, graphs=False)
    assert torch.equal(_greedy(m, ids, None, graphs=True), eager)
    with torch.no_grad():
        c2 = getattr(m(ids, use_cache=True, logits_to_keep=1), CACHE_FIELD)
        assert torch.equal(m(ids[:, :1], cache=c2, use_cache=True).logits, first)


def test_hooks_keep_steps_eager():
    """A captured graph would replay modules as they were: a forward hook added later must be honoured."""
    m = build("7", torch.bfloat16, n_layer=2)
    ids = torch.randint(0, 65536, (1, 8), generator=torch.Generator().manual_seed(10)).to(DEV)
    plain = _greedy(m, ids, None, graphs=True)

    def force_7(module, args, out):
        out = out.clone()
        out[..., 7] = 1e4
        return out

    handle = m.lm_head.register_forward_hook(force_7)
    try:
        forced = _greedy(m, ids, None, graphs=True)
    finally:
        handle.remove()
    assert (forced[0, ids.shape[1] :] == 7).all()
    assert torch.equal(_greedy(m, ids, None, graphs=True), plain)


def test_beam_search_and_sampling_through_graphs():
    m = build("6", torch.bfloat16, n_layer=2)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, 65536, (2, 10), generator=g).to(DEV)
    beams = {graphs: _greedy(m, ids, None, graphs, num_beams=3) for graphs in (False, True)}
    assert torch.equal(beams[True], beams[False])
    with torch.no_grad():
        torch.manual_seed(0)
        out = m.generate(ids, max_new_tokens=8, do_sample=True, top_k=20, pad_token_id=0)
    assert out.shape == (2, 18)
    # the decoders kept for a model do not keep it alive
    import gc
    import weakref

    ref = weakref.ref(m)
    del m
    gc.collect()
    assert ref() is None


def test_long_prompt_prefill_memory():
    """A 131,072-token prompt at batch 1, 1.5B-shaped RWKV-7 in bf16: peak memory under weights + 2 GB."""
    import gc

    import rwkv_hf.modeling as M
    from rwkv_hf.modeling import Rwkv7Config

    gc.collect()
    torch.cuda.empty_cache()
    cfg = Rwkv7Config(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, head_size=64,
                      decay_lora=96, a_lora=96, v_lora=64, gate_lora=256)
    with torch.device(DEV):
        m = M.Rwkv7ForCausalLM(cfg).to(torch.bfloat16).eval()
    weights = sum(p.numel() * p.element_size() for p in m.parameters())
    ids = torch.randint(0, 65536, (1, 131072), device=DEV)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    with torch.no_grad():
        out = m(ids, use_cache=True, logits_to_keep=1)
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    print(f"\n131072-token prefill: weights {weights / 2**30:.2f} GiB, peak above them {extra / 2**30:.2f} GiB")
    assert out.logits.shape == (1, 1, 65536) and torch.isfinite(out.logits).all()
    assert extra < 2e9  # 2 GB


@pytest.mark.gpu
@pytest.mark.parametrize("version", ["5.2", "7"])
@pytest.mark.parametrize("where", ["argument", "config"])
def test_recurrent_mode_is_honoured_on_cuda_decode(version, where, monkeypatch):
    """wkv_mode="recurrent" decodes on CUDA with the recurrence, in the captured graph too (never fla's
    kernels); its greedy tokens equal the fp32 CPU recurrence's."""
    from rwkv_hf.modeling import modeling_rwkv5, modeling_rwkv7, rwkv_decode

    fail = lambda *a, **k: pytest.fail("a decode step left the recurrence")  # noqa: E731
    for module in (modeling_rwkv5, modeling_rwkv7):
        monkeypatch.setitem(module.WKV_FORMS, "fla", fail)
        monkeypatch.setitem(module.WKV_FORMS, "chunk", fail)
    m = build(version, torch.float32, n_layer=2)
    kw = {"wkv_mode": "recurrent"}
    if where == "config":
        m.config.wkv_mode, kw = "recurrent", {}
    ids = torch.randint(0, 65536, (2, 9), generator=torch.Generator().manual_seed(11))
    with torch.no_grad():
        gpu = m.generate(ids.to(DEV), max_new_tokens=8, do_sample=False, pad_token_id=0, **kw)
        paths = [d.path for d in rwkv_decode._DECODERS[m].values()]
        cpu = m.to("cpu").generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, wkv_mode="recurrent")
    assert [(p.runner, p.wkv) for p in paths] == [("graph", "recurrent")], paths
    assert gpu.cpu().tolist() == cpu.tolist()


# ------------------------------------------------------------- generate()'s own loop (rwkv_generate)
def _both_loops(m, seed=0, **kw):
    """(transformers' loop's result, our loop's) of one generate() call, each after torch.manual_seed(seed)."""
    out = []
    for own in (False, True):
        torch.manual_seed(seed)
        with torch.no_grad():
            if own:
                out.append(m.generate(**kw))
            else:
                with transformers_generate_loop():
                    out.append(m.generate(**kw))
    return out


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_own_generate_loop_gives_transformers_tokens_on_cuda(version, batch):
    """bf16, steps replayed from the captured graph: our loop's greedy and seeded sampled tokens are
    transformers' loop's; with EOS tokens that stop every row part way (our loop looks every 8 steps,
    so it runs past the end and undoes it), the result is cut where transformers' is and the returned
    cache is transformers' state exactly."""
    from rwkv_hf.modeling import rwkv_decode
    from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD

    m = build(version, torch.bfloat16, n_layer=3)
    ids, mask = prompts(batch, seed=9)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=24, pad_token_id=0)
    theirs, ours = _both_loops(m, do_sample=False, eos_token_id=None, **kw)
    assert rwkv_decode._DECODERS.get(m), "the graph path was not taken"
    assert torch.equal(theirs, ours), (theirs, ours)
    theirs, ours = _both_loops(m, seed=3, do_sample=True, top_k=50, top_p=0.95, temperature=0.9, repetition_penalty=1.2,
                               eos_token_id=None, **kw)
    assert torch.equal(theirs, ours), (theirs, ours)
    # every row stops at a token it generates at step 5 + row (0-based) or earlier
    sample = dict(do_sample=True, top_k=50)
    _, free = _both_loops(m, seed=3, eos_token_id=None, **sample, **kw)
    eos = sorted({row[5 + r] for r, row in enumerate(free[:, ids.shape[1]:].tolist())})
    theirs, ours = _both_loops(m, seed=3, eos_token_id=eos, return_dict_in_generate=True, **sample, **kw)
    assert torch.equal(theirs.sequences, ours.sequences)
    print(f"\nv{version} b{batch}: stopped after {ours.sequences.shape[1] - ids.shape[1]} of 24 new tokens")
    a, b = getattr(theirs, CACHE_FIELD), getattr(ours, CACHE_FIELD)
    assert a.seen_tokens == b.seen_tokens
    flat = lambda c: [t for s in c.layers_state for x in s for t in (x if isinstance(x, tuple) else (x,))]  # noqa: E731
    for x, y in zip(flat(a), flat(b)):
        assert torch.equal(x, y)


def _count_syncs(fn) -> int:
    """How many synchronizing CUDA operations fn() makes (torch's sync debug mode, as warnings)."""
    import warnings

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@pytest.mark.gpu
def test_own_generate_loop_syncs_every_few_steps():
    """transformers' loop waits for the GPU every token; ours only when it looks (every 8 steps) and
    in the prefill. Printed for sampling too (whether torch.multinomial itself syncs on this torch)."""
    from rwkv_hf.modeling.rwkv_generate import STOP_CHECK_EVERY

    m = build("7", torch.bfloat16, n_layer=2)
    ids, mask = prompts(2, seed=1)
    n = 64
    counts = {}
    for name, kw in (("greedy", dict(do_sample=False)), ("sampling", dict(do_sample=True, top_k=50, top_p=0.9))):
        kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, pad_token_id=0, eos_token_id=0, **kw)
        with torch.no_grad():
            m.generate(**kw)  # capture the graphs first
            # generate()'s preparation, the prefill and one look: what any call costs
            one = _count_syncs(lambda: m.generate(**{**kw, "max_new_tokens": 1, "min_new_tokens": 1}))
            with transformers_generate_loop():
                theirs = _count_syncs(lambda: m.generate(**kw))
            ours = _count_syncs(lambda: m.generate(**kw))
        counts[name] = (theirs, ours)
        print(f"\n{name}, {n} new tokens: syncs through transformers' loop {theirs}, our loop {ours} "
              f"(a call for one token: {one})")
    theirs, ours = counts["greedy"]
    assert theirs >= n
    assert ours <= one + n // STOP_CHECK_EVERY["cuda"]


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["graphs", "compiled_default"])
def test_own_generate_loop_speed(compiled):
    """Prints generate()'s tok/s with our loop and with transformers' (1.5B-shaped RWKV-7, bf16, random
    weights; 200 new tokens after a 16-token prompt; batch 1 and 32). No assertion: a measurement."""
    import time

    import rwkv_hf.modeling as M
    from rwkv_hf.modeling import Rwkv7Config

    cfg = Rwkv7Config(hidden_size=2048, num_hidden_layers=24, intermediate_size=8192, head_size=64,
                      decay_lora=96, a_lora=96, v_lora=64, gate_lora=256)
    with torch.device(DEV):
        m = M.Rwkv7ForCausalLM(cfg).to(torch.bfloat16).eval()
    m.config.compile_decode = None if compiled else False
    n = 200
    for B in (1, 32):
        ids = torch.randint(0, 65536, (B, 16), generator=torch.Generator().manual_seed(B)).to(DEV)
        kw = dict(max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=0)
        rates = {}
        for name in ("transformers", "ours"):
            def gen(name=name):
                with torch.no_grad():
                    if name == "ours":
                        return m.generate(ids, **kw)
                    with transformers_generate_loop():
                        return m.generate(ids, **kw)

            gen()  # capture (and compile)
            torch.cuda.synchronize()
            times = []
            for _ in range(3):
                t = time.perf_counter()
                out = gen()
                torch.cuda.synchronize()
                times.append(time.perf_counter() - t)
            assert out.shape == (B, 16 + n)
            rates[name] = B * n / sorted(times)[1]
        print(f"\ngenerate() {'compiled step (the default)' if compiled else 'graphs, compile_decode=False'} b{B}, {n} new tokens: "
              f"transformers' loop {rates['transformers']:,.0f} tok/s, our loop {rates['ours']:,.0f} tok/s "
              f"({rates['ours'] / rates['transformers']:.2f}x)")
