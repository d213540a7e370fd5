"""Every version's decode step as a few Triton kernels per layer: faster forms of each
`modeling_rwkvN`'s `time_mix`/`channel_mix` for one token per row, beside the plain step that they
are tested against (`tests/test_triton_step.py`: the plain step and the
reference package; `tests/test_gpu.py`: compiled, in a captured graph).

The same launches take a short prompt at once (`triton_step` with T tokens a row): the products run
on B T rows, and `_norm_mix` and the per-head kernels go through a row's T tokens in turn, carrying
the token shift and the state from one to the next (`rwkv_decode.prompt_logits`; where, see
`rwkv_paths.TRITON_PROMPT_MAX`; on the captured path, `RwkvGraphDecoder.prompt` captures it once
for each width). The products of such a launch, which no step tuned, take one tile (`_UNTUNED`).

Why: a decode step reads every weight once, so its floor is the memory bandwidth; the plain step
captured in a CUDA graph is ~68 kernels a layer, the compiled one ~23 (inductor does not fuse a
product with the work around it), and at batch 1 the gaps between small kernels, not the bytes, set
the time. An RWKV-7 layer here is seven kernels:

1. `_norm_mix`: ln1 (block 0: ln0 first) of the residual x, the token shift (the state's previous
   vector in, this one out) and the six mixes x + (x_prev - x) * x_{r,w,k,v,a,g};
2. `_gemv`: the seven products of those mixes, one launch: r = xr R, k = xk K, v = xv V and the
   first LoRA stages tanh(xw w1), xa a1, xv v1, sigmoid(xg g1);
3. `_wkv7_head`: one program per (row, head) for everything after them, all of it local to a head:
   the second LoRA stages (w, a, the v gate, g), kk = normalize(k k_k), k (1 + (a - 1) k_a), the
   v_first mix, the decay, the state update S <- S diag(w) + (S a) b^T + v k^T and y = S r, the
   head's group norm, the bonus sum(r k r_k) v and the gate: (y * g);
4. `_gemv`: x += (y g) O;
5. `_norm_mix`: ln2, its token shift and mix;
6. `_gemv`: relu(xk K)^2;
7. `_gemv`: x += h V.

From batch `LORA_APART_FROM` (8) on it is eight: the second LoRA stages leave `_wkv7_head` for one
`_gemv` launch between 2 and 3 that reads each matrix once for every row; inside `_wkv7_head`
each (row, head) program reads its slices again (on an H200 at batch 32, 1.5B shape: the head
kernels 0.89 -> 0.29 ms a step, the new launches 0.17 ms; at batch 1 the two forms tie).

An RWKV-6 layer is nine: `_norm_mix` (ln1, the shift, xxx = x + sx maa_x, keeping x and sx),
`_gemv` tanh(xxx W1), `_v6_mixes` (the five token-shift LoRAs' second stages and mixes), `_gemv`
(r, k, v, silu(xg G), tanh(xw D1)), `_wkv5_head` (the decay's second stage, the WKV update, the
head's group norm, the gate), `_gemv` x += (y g) O, then the channel mix of v4-v6 (`_channel_mix`):
`_norm_mix` (ln2: xk, xr), `_gemv` (relu(xk K)^2, sigmoid(xr R)) and `_gemv` x += r * (k V).
RWKV-5 (5.0, 5.1, 5.2) is seven: `_norm_mix` (xr, xk, xv [, xg]), `_gemv` (r, k, v [, silu(xg G)]),
`_wkv5_head` (decay per channel or per head), `_gemv` O, and the channel mix. RWKV-4 is seven too:
`_norm_mix` (xk, xv, xr), `_gemv` (k, v, sigmoid(xr R)), `_wkv4` (the (aa, bb, pp) step and r * wkv,
per channel), `_gemv` O, and the channel mix. (Not v4-v6 in fp16, where they rescale.)

The products `x W^T` (`_gemv`) read W once in tiles and multiply on the tensor cores with the batch
padded to 16 rows, so batch 1 and batch 32 read the same bytes; arithmetic is fp32 throughout
(inputs rounded to the model's dtype where the plain step rounds them: the residual stream, the
mixes, the token-shift state, relu^2's output, the logits). A one-segment product (O, the channel
mix's value, the head) may also split K over more programs, each slice's fp32 sums added up in a
fixed order by the tile's last program (the same logits whichever ends last). Which tile and split
each kind of product uses is timed the way the step runs them, all layers' launches of that kind in
one captured graph (`tune_step`, before the decoder captures its step): Triton's autotuner, timing
one launch at a time, picked tiles up to 2x slower. At batch 1 the tuning may also choose
`_gemv_rows`: whole rows of W times the one row of x without tensor cores (no 16-row padding, one or
a few long loads a program). The state is updated in place (the captured graph's buffers).

On Hopper and later every launch of the step is a programmatic dependent launch (`PDL`,
`_after_the_last`): its programs start while the launch before is ending, read what no launch writes
(their part of W, the norms' and mixes' weights, a layer's own state) and only then wait for it. At
batch 1 the step's time was mostly the gaps and ramps between ~170 small launches; on an H200 (1.5B
RWKV-7, session 15) PDL, `_gemv_rows` and the heads' warps took the step from 574 to 818 tok/s at
batch 1 and from 13,464 to 15,577 at batch 32 (benchmarks/README.md). At batch 1 (v7, v5, v4) a
product lets the next launch start only at its end (`PDL_LATE_ROWS`), and a launch of several
segments may start its programs from the last segment's (`SEGMENTS_REVERSED`, a tuning choice).

Used by `rwkv_decode.RwkvGraphDecoder` when `rwkv_paths.pick_path` says `triton` (CUDA with Triton,
wkv_mode "auto", `triton_decode` None or True; every version, not DeepEmbed RWKV-7, not v4-v6 in
fp16). Interpreted (TRITON_INTERPRET=1) the same kernels run on the CPU, which is how the CPU tests
check them (a one-row product there always takes `_gemv_rows`, so the batch-1 tests run it).
"""

from __future__ import annotations

import inspect
import os
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .rwkv_helpers import DECAY_SCALE

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # (CPU-only installs without Triton: the plain step runs)
    HAVE_TRITON = False
Tensor = torch.Tensor
ACT_NONE, ACT_TANH, ACT_SIGMOID, ACT_RELU2, ACT_SILU = 0, 1, 2, 3, 4
MAX_SEGMENTS = 7
META_FIELDS = 6  # a `_gemv` segment's row: (N, input row, output offset, activation, layout, K)


def interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


if HAVE_TRITON:
    _META = tl.constexpr(META_FIELDS)
    try:  # programmatic dependent launch (Hopper on): Triton's grid dependency control
        _GDC = tl.extra.cuda
        HAVE_PDL = hasattr(_GDC, "gdc_wait") and hasattr(_GDC, "gdc_launch_dependents")
    except AttributeError:
        HAVE_PDL = False

    @triton.jit
    def _after_the_last(LATE: tl.constexpr = False):
        """Programmatic dependent launch (a kernel calls this where its PDL is set): wait until the
        launch before this one has ended (its stores seen), then let the next launch start its
        programs. Everything a program reads or writes that another launch writes comes after this;
        before it, only what no launch writes (weights, segment tables, constants) and a layer's
        recurrent state, which only that layer's launch of the step before wrote. Why the state may:
        the next launch starts only once every program here has passed this point, so at most two
        launches overlap, and a launch that starts finds the launch before the one before it, and all
        before that, ended; a layer's launch of the step before lies further back, and no launch
        between writes its state. (Called under `if PDL:`, not taking the flag: under Triton's
        interpreter every call of a jit function costs about a millisecond.) LATE: only wait; the
        program lets the next launch start at its end (`_let_the_next_start`)."""
        _GDC.gdc_wait()
        if not LATE:
            _GDC.gdc_launch_dependents()

    @triton.jit
    def _let_the_next_start():
        """A program whose `_after_the_last` was LATE: its loads are done, the next launch may start
        (once every program of this launch has called this or ended). Early (`_after_the_last`), the
        next launch's programs take SMs while this launch still has programs waiting for one: in a
        launch of more programs than the card holds at once they sit there, waiting, in their way."""
        _GDC.gdc_launch_dependents()

    @triton.jit
    def _vec(ptr, c, m):
        return tl.load(ptr + c, mask=m, other=0.0).to(tl.float32)

    @triton.jit
    def _norm(x, w, b, m, C, eps):
        """Layer norm of x (C entries where m) with weight w and bias b (fp32 vectors)."""
        mean = tl.sum(x, 0) / C
        d = tl.where(m, x - mean, 0.0)
        var = tl.sum(d * d, 0) / C
        return d * tl.rsqrt(var + eps) * w + b

    @triton.jit
    def _coeff(coeff_ptr, c, m, FORM: tl.constexpr):
        """A mix's coefficient as `_mix_out` takes it: m (FORM 0: v6, v7), or 1 - m (FORM 1: v4, v5)."""
        coeff = tl.load(coeff_ptr + c, mask=m, other=0.0).to(tl.float32)
        if FORM == 1:
            coeff = 1.0 - coeff
        return coeff

    @triton.jit
    def _mix_out(out_ptr, row, h, xx, coeff, c, m):
        """h + (prev - h) * m, or h * m + prev * (1 - m) (`_coeff`), stored."""
        tl.store(out_ptr + row + c, (h + xx * coeff).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _real(mask_ptr, r, new, old, HAS_MASK: tl.constexpr):
        """What a row's state becomes after token r: `new`, or (HAS_MASK, padding: mask[r] 0) `old`,
        as if the token were not there (`rwkv_helpers.token_shift`, the masked recurrences)."""
        if HAS_MASK:
            new = tl.where(tl.load(mask_ptr + r) != 0, new, old)
        return new

    @triton.jit
    def _norm_mix(
        x_ptr, ln0_w, ln0_b, ln_w, ln_b, shift_ptr, m0, m1, m2, m3, m4, m5, out_ptr, hx_ptr, C, eps, T, mask_ptr,
        HAS_LN0: tl.constexpr, N_MIX: tl.constexpr, MIX_FORM: tl.constexpr, SAVE_HX: tl.constexpr, BLOCK_C: tl.constexpr,
        HAS_MASK: tl.constexpr, PDL: tl.constexpr,
    ):
        """Row b's T tokens in turn, each row r = b T + t of x: [x = ln0(x), stored;] h = ln(x); with
        mixes: prev = the token before's h (the first's: shift[b]), out[r, i] = h + (prev - h) * m_i for
        i < N_MIX (MIX_FORM 1, v4/v5: h m_i + prev (1 - m_i)) [and hx[r] = (h, prev - h) in fp32, for
        mixes made later: RWKV-6's], and at the end shift[b] = the last h; without (N_MIX 0): out[r] = h.
        HAS_MASK: a token whose mask[r] is 0 (padding) is no token before the next (`_real`)."""
        b = tl.program_id(0)
        c = tl.arange(0, BLOCK_C)
        m = c < C
        # the weights first, PDL: while the launch before ends
        w, bias = _vec(ln_w, c, m), _vec(ln_b, c, m)
        if HAS_LN0:
            w0, bias0 = _vec(ln0_w, c, m), _vec(ln0_b, c, m)
        if N_MIX > 0:
            k0 = _coeff(m0, c, m, MIX_FORM)
        if N_MIX > 1:
            k1 = _coeff(m1, c, m, MIX_FORM)
        if N_MIX > 2:
            k2 = _coeff(m2, c, m, MIX_FORM)
        if N_MIX > 3:
            k3 = _coeff(m3, c, m, MIX_FORM)
        if N_MIX > 4:
            k4 = _coeff(m4, c, m, MIX_FORM)
        if N_MIX > 5:
            k5 = _coeff(m5, c, m, MIX_FORM)
        if PDL:
            _after_the_last()
        if N_MIX > 0:
            prev = tl.load(shift_ptr + b * C + c, mask=m, other=0.0).to(tl.float32)
        for t in range(T):
            r = b * T + t
            x = tl.load(x_ptr + r * C + c, mask=m, other=0.0).to(tl.float32)
            if HAS_LN0:
                x = _norm(x, w0, bias0, m, C, eps).to(x_ptr.dtype.element_ty)
                tl.store(x_ptr + r * C + c, x, mask=m)
                x = x.to(tl.float32)
            h = _norm(x, w, bias, m, C, eps)
            if N_MIX == 0:
                tl.store(out_ptr + r * C + c, h.to(out_ptr.dtype.element_ty), mask=m)
            else:
                # the state keeps the normalised vector as the model's dtype
                h = h.to(shift_ptr.dtype.element_ty).to(tl.float32)
                xx = prev - h
                if SAVE_HX:
                    tl.store(hx_ptr + r * 2 * C + c, h, mask=m)
                    tl.store(hx_ptr + r * 2 * C + C + c, xx, mask=m)
                row = r * N_MIX * C
                _mix_out(out_ptr, row, h, xx, k0, c, m)
                if N_MIX > 1:
                    _mix_out(out_ptr, row + C, h, xx, k1, c, m)
                if N_MIX > 2:
                    _mix_out(out_ptr, row + 2 * C, h, xx, k2, c, m)
                if N_MIX > 3:
                    _mix_out(out_ptr, row + 3 * C, h, xx, k3, c, m)
                if N_MIX > 4:
                    _mix_out(out_ptr, row + 4 * C, h, xx, k4, c, m)
                if N_MIX > 5:
                    _mix_out(out_ptr, row + 5 * C, h, xx, k5, c, m)
                prev = _real(mask_ptr, r, h, prev, HAS_MASK)
        if N_MIX > 0:
            tl.store(shift_ptr + b * C + c, prev.to(shift_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _gemv_out(acc, act, out_ptr, dst, mul_ptr, mul, ok, ACCUMULATE: tl.constexpr, MULTIPLY: tl.constexpr):
        """The end of `_gemv` and `_gemv_rows`: the segment's activation, [times mul_ptr[mul],] [added to
        out_ptr[dst],] stored at out_ptr[dst] (dst, mul, ok: offsets and mask of acc's shape)."""
        if act == 1:  # tanh
            acc = 2.0 * tl.sigmoid(2.0 * acc) - 1.0
        if act == 2:
            acc = tl.sigmoid(acc)
        if act == 3:  # relu^2, squared as the plain step does: after rounding relu's input
            acc = tl.maximum(acc.to(out_ptr.dtype.element_ty).to(tl.float32), 0.0)
            acc = acc * acc
        if act == 4:  # silu
            acc = acc * tl.sigmoid(acc)
        if MULTIPLY:  # RWKV-6's channel mix: r * (k V), each product rounded as the plain step's
            r = tl.load(mul_ptr + mul, mask=ok, other=0.0).to(tl.float32)
            acc = acc.to(out_ptr.dtype.element_ty).to(tl.float32) * r
        if ACCUMULATE:  # the residual stream: x + (rounded product), as x + F.linear(...)
            acc = tl.load(out_ptr + dst, mask=ok, other=0.0).to(tl.float32) + acc.to(out_ptr.dtype.element_ty).to(tl.float32)
        tl.store(out_ptr + dst, acc.to(out_ptr.dtype.element_ty), mask=ok)

    @triton.jit
    def _w_tile(w, ns, n_ok, k0, k_end, K, N, BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr):
        """W's tile at outputs ns, inputs k0 + [0, BLOCK_K) (< k_end): [BLOCK_N, BLOCK_K] (LAYOUT 0, W [N,
        K]) or [BLOCK_K, BLOCK_N] (1, W [K_s, N])."""
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < k_end
        if LAYOUT == 0:
            wt = tl.load(w + ns[:, None] * K + ks[None, :], mask=n_ok[:, None] & k_ok[None, :], other=0.0)
        else:
            wt = tl.load(w + ks[:, None] * N + ns[None, :], mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        return wt

    @triton.jit
    def _dot_tile(acc, wt, x_row, b_ok, k0, k_end, BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_row + ks[None, :], mask=b_ok[:, None] & (ks < k_end)[None, :], other=0.0).to(wt.dtype)
        if UPCAST:
            xt, wt = xt.to(tl.float32), wt.to(tl.float32)
        if LAYOUT == 0:
            wt = tl.trans(wt)
        return acc + tl.dot(xt, wt, input_precision=PRECISION)

    @triton.jit
    def _products(w, x_row, ns, n_ok, b_ok, k_lo, k_end, K, N, BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                  PDL: tl.constexpr, LATE: tl.constexpr):
        """sum over k in [k_lo, k_end) of x[b, k] W[n, k], [BLOCK_B, BLOCK_N] fp32. The first tile of W is
        read before `_after_the_last` (PDL: while the launch before ends), the rest after it."""
        wt = _w_tile(w, ns, n_ok, k_lo, k_end, K, N, BLOCK_K, LAYOUT)
        if PDL:
            _after_the_last(LATE)
        acc = _dot_tile(tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32), wt, x_row, b_ok, k_lo, k_end, BLOCK_K,
                        LAYOUT, PRECISION, UPCAST)
        for k0 in range(k_lo + BLOCK_K, k_end, BLOCK_K):
            acc = _dot_tile(acc, _w_tile(w, ns, n_ok, k0, k_end, K, N, BLOCK_K, LAYOUT), x_row, b_ok, k0, k_end,
                            BLOCK_K, LAYOUT, PRECISION, UPCAST)
        if PDL:
            if LATE:
                _let_the_next_start()
        return acc

    @triton.jit
    def _segment(meta_ptr, seg, w0, w1, w2, w3, w4, w5, w6, ALIGNED: tl.constexpr):
        """Segment seg's row of the table (N, input row, output offset, activation, layout, K_s) and
        its matrix. ALIGNED: every N and K_s is a multiple of 16 (so that a LoRA matrix's rows, [K_s, N],
        load 16 bytes at a time)."""
        N = tl.load(meta_ptr + seg * _META)
        row = tl.load(meta_ptr + seg * _META + 1)
        off = tl.load(meta_ptr + seg * _META + 2)
        act = tl.load(meta_ptr + seg * _META + 3)
        lora = tl.load(meta_ptr + seg * _META + 4)
        k_s = tl.load(meta_ptr + seg * _META + 5)
        if ALIGNED:
            N = tl.multiple_of(N, 16)
            k_s = tl.multiple_of(k_s, 16)
        w = w0
        if seg == 1:
            w = w1
        if seg == 2:
            w = w2
        if seg == 3:
            w = w3
        if seg == 4:
            w = w4
        if seg == 5:
            w = w5
        if seg == 6:
            w = w6
        return N, row, off, act, lora, k_s, w

    @triton.jit
    def _gemv(
        x_ptr, sx_b, sx_r, out_ptr, so_b, mul_ptr, smul_b, meta_ptr, w0, w1, w2, w3, w4, w5, w6, part_ptr, count_ptr,
        B, K, n_max,
        ACCUMULATE: tl.constexpr, MULTIPLY: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_B: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT: tl.constexpr, PDL: tl.constexpr,
        ALIGNED: tl.constexpr, LATE: tl.constexpr = False, REVERSED: tl.constexpr = False,
    ):
        """Segment s of out[b, off_s + n] (+)= [mul[b, n] *] act_s(sum_k x[b, row_s, k] W_s[n, k]).
        meta[s] = (N_s, row_s, off_s, act_s, layout_s, K_s); layout 0: W_s is [N, K] (nn.Linear), 1:
        [K_s, N] (a LoRA matrix, stored input-major; K_s <= K: the second stages' widths differ).
        n_max = max N_s (the grid's extent; a tuning key). x's row s starts at row_s * sx_r.
        Program axes: 0 the tile of BLOCK_N outputs, 2 the tile of BLOCK_B rows, 1 the segment, or
        with SPLIT > 1 (one segment) the slice of K: then each program stores its fp32 partial sums
        in part [slice, b, n] and counts itself in count[tile]; the last of a tile adds the slices up
        in their order (the same sums whichever program ends last), resets the count and finishes.
        More programs in flight for a narrow, deep product (the channel mix's value: 2048 outputs,
        8192 inputs) than one per BLOCK_N rows.
        UPCAST: multiply in fp32 (Triton's interpreter multiplies bf16 tiles wrongly; on a GPU the
        tensor cores take the model's dtype, with fp32 sums). PRECISION: "ieee" for fp32 weights (no
        TF32). PDL: the first tile of W is read before waiting for the launch before (`_products`);
        LATE: the next launch starts when every program is past its products. REVERSED: program row
        s of axis 1 takes segment (segments - 1 - s): the card starts programs in order, and the last
        segments' (RWKV-7's LoRAs: narrow, read with a stride) then start first, not last."""
        pid_n = tl.program_id(0)
        pid_b = tl.program_id(2)
        if SPLIT == 1:
            seg = tl.program_id(1)
            if REVERSED:
                seg = tl.num_programs(1) - 1 - seg
            k_per = K
            kid = 0
        else:
            seg = 0
            k_per = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
            kid = tl.program_id(1)
        k_lo = kid * k_per
        k_hi = tl.minimum(K, k_lo + k_per)
        N, row, off, act, lora, k_s, w = _segment(meta_ptr, seg, w0, w1, w2, w3, w4, w5, w6, ALIGNED)
        bs = pid_b * BLOCK_B + tl.arange(0, BLOCK_B)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_ok = bs < B
        n_ok = ns < N
        if pid_n * BLOCK_N < N:
            x_row = x_ptr + bs[:, None] * sx_b + row * sx_r
            if lora == 0:
                acc = _products(w, x_row, ns, n_ok, b_ok, k_lo, k_hi, K, N, BLOCK_B, BLOCK_N, BLOCK_K, 0, PRECISION,
                                UPCAST, PDL, LATE)
            else:  # (a LoRA stage: its own depth K_s, up to K)
                acc = _products(w, x_row, ns, n_ok, b_ok, k_lo, tl.minimum(k_hi, k_s), K, N, BLOCK_B, BLOCK_N, BLOCK_K,
                                1, PRECISION, UPCAST, PDL, LATE)
            ok = b_ok[:, None] & n_ok[None, :]
            dst = bs[:, None] * so_b + off + ns[None, :]
            if MULTIPLY:
                mul = bs[:, None] * smul_b + ns[None, :]
            else:
                mul = dst  # (unread)
            if SPLIT == 1:
                _gemv_out(acc, act, out_ptr, dst, mul_ptr, mul, ok, ACCUMULATE, MULTIPLY)
            else:
                n_split = tl.cdiv(K, k_per)
                rows_p = tl.num_programs(2) * BLOCK_B
                part = part_ptr + bs[:, None] * n_max + ns[None, :]
                tl.store(part + kid * rows_p * n_max, acc, mask=ok)
                tl.debug_barrier()  # every thread's partial sums stored before the count says so
                tile = count_ptr + pid_b * tl.num_programs(0) + pid_n
                if tl.atomic_add(tile, 1, sem="acq_rel") == n_split - 1:
                    tl.debug_barrier()
                    acc = tl.zeros((BLOCK_B, BLOCK_N), dtype=tl.float32)
                    for s in range(0, n_split):
                        acc += tl.load(part + s * rows_p * n_max, mask=ok, other=0.0, cache_modifier=".cg")
                    tl.atomic_xchg(tile, 0)
                    _gemv_out(acc, act, out_ptr, dst, mul_ptr, mul, ok, ACCUMULATE, MULTIPLY)

    @triton.jit
    def _row_sums(wt, x_row, k0, k_end, BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr):
        """sum over k in k0 + [0, BLOCK_K) of x[k] W[n, k] for outputs ns: the tile wt (`_w_tile`) times
        x, in fp32 without tensor cores, x rounded to W's dtype first (as `_gemv`'s products take it)."""
        ks = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_row + ks, mask=ks < k_end, other=0.0).to(wt.dtype).to(tl.float32)
        if LAYOUT == 0:
            part = tl.sum(wt.to(tl.float32) * xt[None, :], axis=1)
        else:
            part = tl.sum(wt.to(tl.float32) * xt[:, None], axis=0)
        return part

    @triton.jit
    def _row_products(w, x_row, ns, n_ok, k_end, K, N, BLOCK_K: tl.constexpr, LAYOUT: tl.constexpr,
                      PDL: tl.constexpr, LATE: tl.constexpr):
        """`_products` for one row of x: [BLOCK_N] fp32. With BLOCK_K = K the whole of the program's
        part of W is read before the launch before ends (PDL)."""
        wt = _w_tile(w, ns, n_ok, 0, k_end, K, N, BLOCK_K, LAYOUT)
        if PDL:
            _after_the_last(LATE)
        acc = _row_sums(wt, x_row, 0, k_end, BLOCK_K, LAYOUT)
        for k0 in range(BLOCK_K, k_end, BLOCK_K):
            acc += _row_sums(_w_tile(w, ns, n_ok, k0, k_end, K, N, BLOCK_K, LAYOUT), x_row, k0, k_end, BLOCK_K, LAYOUT)
        if PDL:
            if LATE:
                _let_the_next_start()
        return acc

    @triton.jit
    def _gemv_rows(
        x_ptr, sx_r, out_ptr, mul_ptr, meta_ptr, w0, w1, w2, w3, w4, w5, w6, K,
        ACCUMULATE: tl.constexpr, MULTIPLY: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        PDL: tl.constexpr, ALIGNED: tl.constexpr, LATE: tl.constexpr = False, REVERSED: tl.constexpr = False,
    ):
        """`_gemv` for one row of x (batch 1) without tensor cores: program (i, s) multiplies BLOCK_N
        whole rows of segment s's W (outputs i BLOCK_N + [0, BLOCK_N)) by x in fp32, K in BLOCK_K
        chunks. `_gemv` pads the row to a 16-row tile for the tensor cores and goes through K in
        256-wide tiles; here a program's rows are read in one or a few long loads (on an H200, a
        chain of [2048, 2048] products: 4.41 us a product with 16 x 2048 tiles, against 7.46 for
        `_gemv`'s best tile; benchmarks/grid_barrier.py). `tune_step` chooses between the two.
        LATE and REVERSED as `_gemv`'s."""
        pid_n = tl.program_id(0)
        seg = tl.program_id(1)
        if REVERSED:
            seg = tl.num_programs(1) - 1 - seg
        N, row, off, act, lora, k_s, w = _segment(meta_ptr, seg, w0, w1, w2, w3, w4, w5, w6, ALIGNED)
        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        if pid_n * BLOCK_N < N:
            x_row = x_ptr + row * sx_r
            if lora == 0:
                acc = _row_products(w, x_row, ns, n_ok, K, K, N, BLOCK_K, 0, PDL, LATE)
            else:
                acc = _row_products(w, x_row, ns, n_ok, tl.minimum(K, k_s), K, N, BLOCK_K, 1, PDL, LATE)
            _gemv_out(acc, act, out_ptr, off + ns, mul_ptr, ns, n_ok, ACCUMULATE, MULTIPLY)

    @triton.jit
    def _head_inputs(buf_ptr, s_buf, r, C, cols):
        """Row r of buf (where it starts) and the head's r, k, v there, which lead every version's buf."""
        base = buf_ptr + r * s_buf
        return base, tl.load(base + cols), tl.load(base + C + cols), tl.load(base + 2 * C + cols)

    @triton.jit
    def _lora_w(D, w_ptr, cols, C, d):
        """The head's columns of a LoRA's second-stage matrix W [D, C]: [BLOCK_D, N], rows from D on 0."""
        return tl.load(w_ptr + d[:, None] * C + cols[None, :], mask=(d < D)[:, None], other=0.0)

    @triton.jit
    def _lora2(base, hid_off, D, wt, d):
        """sum_i hid[i] W[i, cols] for the head's columns (wt: `_lora_w`): a LoRA's second stage."""
        hid = tl.load(base + hid_off + d, mask=d < D, other=0.0)
        return tl.sum(hid[:, None] * wt.to(tl.float32), axis=0)

    @triton.jit
    def _second(base, hid_off, D, wt, d, lo_ptr, j, cols, C, APART: tl.constexpr):
        """LoRA j's second stage for the head's columns: `_lora2` here, or (APART) read from lo [b]
        = [w | a | v | g] (fp32), which `_gemv` computed for all rows at once."""
        if APART:
            y = tl.load(lo_ptr + j * C + cols)
        else:
            y = _lora2(base, hid_off, D, wt, d)
        return y

    @triton.jit
    def _wkv7_head(
        buf_ptr, s_buf, C, H, o_w, o_a, o_v, o_g, w2, a2, v2, g2, DW, DA, DV, DG,
        w0_ptr, a0_ptr, v0_ptr, kk_ptr, ka_ptr, rk_ptr, lnx_w, lnx_b, eps, decay_scale, S_ptr, vfirst_ptr, out_ptr,
        lo_ptr, T, mask_ptr, FIRST: tl.constexpr, N: tl.constexpr, BW: tl.constexpr, BA: tl.constexpr,
        BV: tl.constexpr, BG: tl.constexpr, APART: tl.constexpr, HAS_MASK: tl.constexpr, PDL: tl.constexpr,
    ):
        """Row b (axis 0), head h (axis 1): everything of the time mix between its products and O, for
        the row's T tokens in turn (rows r = b T + t of buf, v_first, out; the state carried between).
        buf[r] = [r | k | v | tanh(xw w1) | xa a1 | xv v1 | sigmoid(xg g1)], fp32. APART: the second
        LoRA stages are in lo [r] (`_second`): at a larger batch, each program reading the head's
        slices of w2, a2, v2, g2 again is what the kernel's time goes to. BW, BA, BV, BG: the LoRA
        widths DW, DA, DV, DG rounded up to powers of two."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.arange(0, N)
        dw, da, dv, dg = tl.arange(0, BW), tl.arange(0, BA), tl.arange(0, BV), tl.arange(0, BG)
        cols = h * N + n
        every = n < N
        s_ptrs = S_ptr + ((b * H + h) * N + n[:, None]) * N + n[None, :]  # S[value, key]
        # before `_after_the_last`: the weights, and the state, which only this layer's launch wrote
        S = tl.load(s_ptrs)
        w0, a0, k_k = _vec(w0_ptr, cols, every), _vec(a0_ptr, cols, every), _vec(kk_ptr, cols, every)
        k_a, r_k = _vec(ka_ptr, cols, every), _vec(rk_ptr, cols, every)
        ln_w, ln_b = _vec(lnx_w + h * N, n, every), _vec(lnx_b + h * N, n, every)
        if FIRST:
            v0 = w0
        else:
            v0 = _vec(v0_ptr, cols, every)
        if APART:
            ww, wa, wv, wg = w0, w0, w0, w0  # (unread)
        else:
            ww, wa, wg = _lora_w(DW, w2, cols, C, dw), _lora_w(DA, a2, cols, C, da), _lora_w(DG, g2, cols, C, dg)
            if FIRST:
                wv = ww  # (unread)
            else:
                wv = _lora_w(DV, v2, cols, C, dv)
        if PDL:
            _after_the_last()
        for t in range(T):
            row = b * T + t
            base, r, k, v = _head_inputs(buf_ptr, s_buf, row, C, cols)
            lo = lo_ptr + row * 4 * C
            w = w0 + _second(base, o_w, DW, ww, dw, lo, 0, cols, C, APART)
            a = tl.sigmoid(a0 + _second(base, o_a, DA, wa, da, lo, 1, cols, C, APART))
            g = _second(base, o_g, DG, wg, dg, lo, 3, cols, C, APART)
            kk = k * k_k
            kk = kk / tl.maximum(tl.sqrt(tl.sum(kk * kk, 0)), 1e-12)  # F.normalize
            k = k * (1.0 + (a - 1.0) * k_a)
            if FIRST:
                tl.store(vfirst_ptr + row * C + cols, v)
            else:
                gate = tl.sigmoid(v0 + _second(base, o_v, DV, wv, dv, lo, 2, cols, C, APART))
                v = v + (tl.load(vfirst_ptr + row * C + cols) - v) * gate
            decay = tl.exp(-decay_scale * tl.sigmoid(w))
            sa = tl.sum(S * (-kk)[None, :], axis=1)
            new = S * decay[None, :] + sa[:, None] * (kk * a)[None, :] + v[:, None] * k[None, :]
            S = _real(mask_ptr, row, new, S, HAS_MASK)
            y = _norm(tl.sum(new * r[None, :], axis=1), ln_w, ln_b, every, N, eps)  # the head's group norm
            y += tl.sum(r * k * r_k, 0) * v
            tl.store(out_ptr + row * C + cols, (y * g).to(out_ptr.dtype.element_ty))
        tl.store(s_ptrs, S)

    @triton.jit
    def _mix_lora(hid_ptr, wt, i, D, h, xx, coeff, out_ptr, C, c, m, d):
        """RWKV-6's data-dependent mix i for columns c: h + xx * (maa_i + hid_i W2[i]) (wt: W2[i]'s
        columns c, coeff: maa_i's), stored."""
        hid = tl.load(hid_ptr + i * D + d, mask=d < D, other=0.0)
        lora = tl.sum(hid[:, None] * wt.to(tl.float32), axis=0)
        tl.store(out_ptr + i * C + c, (h + xx * (coeff + lora)).to(out_ptr.dtype.element_ty), mask=m)

    @triton.jit
    def _v6_mixes(hid_ptr, w2_ptr, hx_ptr, mw, mk, mv, mr, mg, out_ptr, C, D, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
                  PDL: tl.constexpr):
        """Row b (axis 0), columns (axis 1): the five mixes xw, xk, xv, xr, xg = h + xx (maa_* + m_*), with
        m_* the second stages of the token-shift LoRAs (hid: tanh(xxx W1), fp32; W2 [5, D, C])."""
        b = tl.program_id(0)
        c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        m = c < C
        d = tl.arange(0, BLOCK_D)
        tiles = w2_ptr + d[:, None] * C + c[None, :]
        tm = (d < D)[:, None] & m[None, :]
        w_w, w_k, w_v = tl.load(tiles, mask=tm, other=0.0), tl.load(tiles + D * C, mask=tm, other=0.0), tl.load(tiles + 2 * D * C, mask=tm, other=0.0)
        w_r, w_g = tl.load(tiles + 3 * D * C, mask=tm, other=0.0), tl.load(tiles + 4 * D * C, mask=tm, other=0.0)
        c_w, c_k, c_v, c_r, c_g = _vec(mw, c, m), _vec(mk, c, m), _vec(mv, c, m), _vec(mr, c, m), _vec(mg, c, m)
        if PDL:
            _after_the_last()
        h = tl.load(hx_ptr + b * 2 * C + c, mask=m, other=0.0)
        xx = tl.load(hx_ptr + b * 2 * C + C + c, mask=m, other=0.0)
        hid, out = hid_ptr + b * 5 * D, out_ptr + b * 5 * C
        _mix_lora(hid, w_w, 0, D, h, xx, c_w, out, C, c, m, d)
        _mix_lora(hid, w_k, 1, D, h, xx, c_k, out, C, c, m, d)
        _mix_lora(hid, w_v, 2, D, h, xx, c_v, out, C, c, m, d)
        _mix_lora(hid, w_r, 3, D, h, xx, c_r, out, C, c, m, d)
        _mix_lora(hid, w_g, 4, D, h, xx, c_g, out, C, c, m, d)

    @triton.jit
    def _wkv5_head(
        buf_ptr, s_buf, C, H, o_d, dw2, DD, decay_ptr, u_ptr, lnx_w, lnx_b, eps, S_ptr, out_ptr, T, mask_ptr,
        N: tl.constexpr, BLOCK_D: tl.constexpr, DECAY_LORA: tl.constexpr, PER_HEAD: tl.constexpr,
        GATED: tl.constexpr, HAS_MASK: tl.constexpr, PDL: tl.constexpr,
    ):
        """RWKV-5 and RWKV-6, row b (axis 0), head h (axis 1), its T tokens in turn (rows r = b T + t):
        the decay, the WKV update y = r (S + diag(u) k^T v), S <- diag(w) S + k^T v (S [key, value]),
        the head's group norm and the gate. buf[r] = [r | k | v | g (silu(xg G), GATED) | tanh(xw D1)
        (DECAY_LORA)], fp32. The decay w = exp(-exp(d)): d = time_decay + the LoRA's second stage (v6),
        time_decay per channel with u = time_faaaa (5.2), or one per head with u = exp(time_first)
        (PER_HEAD: 5.0, 5.1)."""
        b = tl.program_id(0)
        h = tl.program_id(1)
        n = tl.arange(0, N)
        d = tl.arange(0, BLOCK_D)
        cols = h * N + n
        if PER_HEAD:
            w0 = tl.zeros([N], dtype=tl.float32) + tl.load(decay_ptr + h).to(tl.float32)
            u = tl.exp(tl.zeros([N], dtype=tl.float32) + tl.load(u_ptr + h).to(tl.float32))
        else:
            w0 = tl.load(decay_ptr + cols).to(tl.float32)
            u = tl.load(u_ptr + cols).to(tl.float32)  # time_faaaa [H, N]: row h is the head's
        s_ptrs = S_ptr + ((b * H + h) * N + n[:, None]) * N + n[None, :]  # S[key, value]
        # before `_after_the_last`: the weights, and the state, which only this layer's launch wrote
        S = tl.load(s_ptrs)
        every = n < N
        ln_w, ln_b = _vec(lnx_w + h * N, n, every), _vec(lnx_b + h * N, n, every)
        if DECAY_LORA:
            wd = _lora_w(DD, dw2, cols, C, d)
        if PDL:
            _after_the_last()
        for t in range(T):
            row = b * T + t
            base, r, k, v = _head_inputs(buf_ptr, s_buf, row, C, cols)
            w = w0
            if DECAY_LORA:
                w += _lora2(base, o_d, DD, wd, d)
            decay = tl.exp(-tl.exp(w))
            a = k[:, None] * v[None, :]
            y = tl.sum(r[:, None] * (u[:, None] * a + S), axis=0)
            S = _real(mask_ptr, row, a + decay[:, None] * S, S, HAS_MASK)
            y = _norm(y, ln_w, ln_b, every, N, eps)  # the head's group norm
            if GATED:
                y = y * tl.load(base + 3 * C + cols)
            tl.store(out_ptr + row * C + cols, y.to(out_ptr.dtype.element_ty))
        tl.store(s_ptrs, S)

    @triton.jit
    def _wkv4(buf_ptr, s_buf, A, decay_ptr, first_ptr, aa_ptr, bb_ptr, pp_ptr, out_ptr, T, mask_ptr,
              BLOCK: tl.constexpr, HAS_MASK: tl.constexpr, PDL: tl.constexpr):
        """RWKV-4, row b (axis 0), channels (axis 1), its T tokens in turn (rows r = b T + t): the
        overflow-free WKV step on the state (aa, bb, pp), in place, and r * wkv. buf[r] = [k | v |
        sigmoid(xr R)], fp32."""
        b = tl.program_id(0)
        c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        m = c < A
        log_w = -tl.exp(tl.load(decay_ptr + c, mask=m, other=0.0).to(tl.float32))
        u = tl.load(first_ptr + c, mask=m, other=0.0).to(tl.float32)
        st = b * A + c
        # before `_after_the_last`: the weights, and the state, which only this layer's launch wrote
        aa = tl.load(aa_ptr + st, mask=m, other=0.0)
        bb = tl.load(bb_ptr + st, mask=m, other=0.0)
        pp = tl.load(pp_ptr + st, mask=m, other=0.0)
        if PDL:
            _after_the_last()
        for t in range(T):
            row = b * T + t
            base = buf_ptr + row * s_buf
            k = tl.load(base + c, mask=m, other=0.0)
            v = tl.load(base + A + c, mask=m, other=0.0)
            r = tl.load(base + 2 * A + c, mask=m, other=0.0)
            ww = u + k
            p = tl.maximum(pp, ww)
            e1, e2 = tl.exp(pp - p), tl.exp(ww - p)
            y = (e1 * aa + e2 * v) / (e1 * bb + e2)
            ww = log_w + pp
            p = tl.maximum(ww, k)
            e1, e2 = tl.exp(ww - p), tl.exp(k - p)
            aa = _real(mask_ptr, row, e1 * aa + e2 * v, aa, HAS_MASK)
            bb = _real(mask_ptr, row, e1 * bb + e2, bb, HAS_MASK)
            pp = _real(mask_ptr, row, p, pp, HAS_MASK)
            # r * y.to(dtype), as the plain step rounds them
            y = y.to(out_ptr.dtype.element_ty).to(tl.float32)
            tl.store(out_ptr + row * A + c, (r.to(out_ptr.dtype.element_ty).to(tl.float32) * y).to(out_ptr.dtype.element_ty), mask=m)
        tl.store(aa_ptr + st, aa, mask=m)
        tl.store(bb_ptr + st, bb, mask=m)
        tl.store(pp_ptr + st, pp, mask=m)

    # the tiles the step tunes over (`tune_step`): on an H200 (1.5B RWKV-7, session 11) a step picked
    # (32, 256) for r/k/v and the LoRAs, (16, 256) for O and the channel mix's key, (32, 256, K in 4
    # slices) for its value and (64, 128) for the head, at batch 1 and 32. The last three tiles here and
    # the last four split ones came in session 17 (benchmarks/step_parts.py --extra-tiles, the same
    # card and model): at batch 32 the channel mix's value took (64, 256, K in 4 slices, 8 warps), 13.6
    # us a launch against 15.0, the second LoRA stages (64, 64) and the channel mix's key (32, 128), and
    # the captured step went from 2,016 to 1,811 us (batch 1: 1,177 and 1,183, the same picks)
    _GEMV_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1}, num_warps=nw, num_stages=ns)
        for bn, bk, nw, ns in ((16, 256, 4, 3), (32, 256, 4, 3), (64, 128, 4, 3), (16, 512, 4, 2), (64, 256, 8, 3),
                               (32, 128, 4, 4), (64, 64, 4, 4), (128, 128, 8, 3))
    ]
    # one-segment launches (O, the channel mix's value, the head) may split K too
    _SPLIT_CONFIGS = _GEMV_CONFIGS + [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": sp}, num_warps=nw, num_stages=ns)
        for bn, bk, sp, nw, ns in ((16, 256, 2, 4, 3), (16, 256, 4, 4, 3), (32, 256, 2, 4, 3), (32, 256, 4, 4, 3),
                                   (64, 256, 4, 8, 3), (64, 128, 4, 4, 3), (64, 128, 8, 4, 3), (32, 128, 8, 4, 4))
    ]
    MAX_SPLIT = max(c.kwargs["SPLIT"] for c in _SPLIT_CONFIGS)
    # batch 1 may also take `_gemv_rows` (ROWS): whole rows, or K in halves, BLOCK_N rows a program. The
    # 4-row tiles: on an H200 (1.5B RWKV-7, session 19, step_parts.py --extra-tiles) O, the channel mix's
    # key and value and the head took them (us a launch: 4.15 against 4.38 for 8 rows, 9.76 / 10.29,
    # 10.15 / 11.21, 62.9 / 63.3), the captured step 1,095 us against 1,126
    _ROWS_CONFIGS = [
        triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT": 1, "ROWS": True}, num_warps=nw, num_stages=1)
        for bn, bk, nw in ((16, 2048, 8), (8, 2048, 4), (32, 1024, 8), (16, 1024, 4), (4, 2048, 4), (4, 2048, 2))
    ]
    # the tile of a product no step tuned (a prompt's, `triton_step` with T tokens a row), by precision:
    # 64 x 128 (16 x 256 for fp32's "ieee" products). Triton's autotuner built 9 variants of each kind
    # and timed them, 8 to 41 s on a cold H200
    _UNTUNED = {"tf32": _GEMV_CONFIGS[2], "ieee": _GEMV_CONFIGS[0]}

    def _prune(configs, named_args, **kwargs):
        """fp32 weights (no tensor cores: "ieee" products): the small tiles (`_small`)."""
        if {**named_args, **kwargs}.get("PRECISION") == "ieee":
            return [c for c in configs if _small(c)]
        return configs

    # the timings are kept on disk where this Triton can (cache_results): a new process skips the tuning
    _tune_kw = {"cache_results": True} if "cache_results" in inspect.signature(triton.autotune).parameters else {}
    _tune = lambda configs: triton.autotune(  # noqa: E731
        configs, key=["K", "BLOCK_B", "ACCUMULATE", "MULTIPLY", "n_max"], restore_value=["out_ptr"],
        prune_configs_by={"early_config_prune": _prune}, **_tune_kw)(_gemv)
    _gemv_tuned, _gemv_split_tuned = _tune(_GEMV_CONFIGS), _tune(_SPLIT_CONFIGS)

# Module settings, read at each launch, so that a benchmark compares them in one process. SPLIT_K:
# one-segment products may be tuned with K split as well. STEP_TUNING: `RwkvGraphDecoder` tunes the
# products with `tune_step` before capturing (else Triton's autotuner picks, launch by launch).
SPLIT_K = True
STEP_TUNING = True
# RWKV-7 from this batch on: the second LoRA stages as one `_gemv` launch for all rows, not inside
# `_wkv7_head`, where every (row, head) program reads its slices of the four matrices again
LORA_APART_FROM = 8
# RWKV-6's `_v6_mixes`: columns a program (its grid: rows x C / this)
V6_MIX_BLOCK = 64
# programmatic dependent launch on CUDA cards that have it (compute capability 9 on): each launch of the
# step may start while the one before ends, reading its weights meanwhile (`_after_the_last`)
PDL = True
# where a product lets the next launch start (PDL): at once, after its wait, or (`late`) at its end
# (`_let_the_next_start`): for launches of up to PDL_LATE_ROWS rows, in these versions' steps. On an
# H200 (1.5B, batch 1, session 18, each tuned afresh, one process) the step went 824 -> 850 tok/s for
# RWKV-7, 847 -> 852 for 5.2, 886 -> 892 for 4, and 752 -> 744 for RWKV-6; at batch 32 RWKV-7 17,243 ->
# 15,937 (the per-head kernels late as well: 767 at batch 1, 16,818 at 32)
PDL_LATE_ROWS = 1
PDL_LATE_VERSIONS = ("rwkv7_world", "rwkv5_world", "rwkv4_world")
# a launch of several segments (r/k/v and the LoRAs) may start its programs from the last segment's:
# `tune_step` times each tile in both orders. On an H200 (1.5B, batch 1, session 18) RWKV-7's r/k/v and
# LoRA launch took 9.8 us reversed against 11.4 (its four LoRA segments, narrow and read with a stride,
# last in line otherwise), RWKV-6's 10.1 in order against 11.1, its channel mix 12.0 reversed against 13.6
SEGMENTS_REVERSED = True
# batch-1 products may be tuned with `_gemv_rows` among the candidates
ROWS = True
# warps a program of `_wkv7_head` / `_wkv5_head`; None: 8 for fewer rows than `LORA_APART_FROM`, else 4.
# On an H200 (1.5B RWKV-7, decode_step.py, session 15) 4 / 8 / 16 warps gave 371 / 745 / 665 tok/s at
# batch 1 (with 4, the LoRA tiles kept 1.3 KB a thread out of registers) and 17,055 / 14,906 / 13,315
# at batch 32
HEAD_WARPS = None
_CAPABILITY: dict = {}
_SCRATCH: dict = {}
_CHOSEN: dict = {}  # a launch's tuning key -> the config `tune_step` timed fastest
_RECORD: Optional[dict] = None  # while `tune_step` records a step: tuning key -> that step's launches
_TIMINGS: dict = {}  # tuning key -> `tune_step`'s times of its candidates (us a launch)


def _cdiv(a: int, b: int) -> int:
    """ceil(a / b) on the host. (Triton's `cdiv` and `next_power_of_2` are constexpr functions in newer
    Tritons: some 8 us a call, ~900 calls in an uncaptured RWKV-7 step of 24 layers.)"""
    return -(-a // b)


def _pow2(n: int) -> int:
    """The least power of two >= n (n >= 1)."""
    return 1 << (n - 1).bit_length()


def _pdl(device: torch.device, late: Optional[bool] = None) -> dict:
    """A launch's PDL arguments on `device`: the kernel's flag and, where on, Triton's launch option
    [and, for a kernel that takes it, LATE: `late`]."""
    if not (PDL and HAVE_TRITON and HAVE_PDL) or device.type != "cuda" or interpreted():
        return {"PDL": False}
    if device not in _CAPABILITY:
        _CAPABILITY[device] = torch.cuda.get_device_capability(device)
    if _CAPABILITY[device] < (9, 0):
        return {"PDL": False}
    return {"PDL": True, "launch_pdl": True, **({} if late is None else {"LATE": late})}


def _scratch(device: torch.device, rows: int, n: int, split: int):
    """Split-K's partial sums [split, rows, n] (fp32) and its per-tile counts (zeros; each launch leaves
    them zero), one pair per device and size, kept for the process (a captured graph holds them).
    Shared by every launch of that size: safe in one stream, whose launches run one after another;
    two graphs replayed at once on two streams would race on the counts (nothing here does that)."""
    key = (str(device), rows, n, split)
    if key not in _SCRATCH:
        tiles = _cdiv(n, 16) * _cdiv(rows, 16)
        _SCRATCH[key] = (torch.empty(split * rows * n, device=device, dtype=torch.float32),
                         torch.zeros(tiles, device=device, dtype=torch.int32))
    return _SCRATCH[key]


def row_block(rows: int) -> int:
    """`_gemv`'s rows a program (BLOCK_B, part of a product's tuning key): the batch padded to 16, 32
    or 64 rows for the tensor cores."""
    return 16 if rows <= 16 else (32 if rows <= 32 else 64)


# a `_gemv` config's grid-shaping part (the rest, REVERSED among them, only the kernel takes)
_TILE = ("BLOCK_N", "BLOCK_K", "SPLIT")


def _grid(n_max: int, segments: int, K: int, B: int, block_b: int, BLOCK_N: int, BLOCK_K: int, SPLIT: int) -> tuple:
    """`_gemv`'s grid: output tiles, then the segments (SPLIT 1) or the slices of K (as the kernel cuts
    them: SPLIT slices rounded up to whole BLOCK_K, so there may be fewer), then row tiles."""
    k_per = _cdiv(_cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    return _cdiv(n_max, BLOCK_N), segments if SPLIT == 1 else _cdiv(K, k_per), _cdiv(B, block_b)


def _gemv_call(x: Tensor, out: Tensor, meta: Tensor, weights: List[Tensor], n_max: int, accumulate: bool = False,
               multiply: Optional[Tensor] = None, depth: Optional[int] = None, late: bool = False) -> None:
    """`_gemv` over x [B, rows, K] (or [B, K], rows may be strided) into out [B, *]; `weights` one per
    row of `meta`; `multiply` [B, n_max]: the products are multiplied by it (before accumulating).
    `depth`: the second LoRA stages, x [B, *] whose segment s starts at column row_s, K = depth (the
    widest; each its own K_s). `late`: with PDL, the next launch starts at this one's end (`_late`)."""
    B, K = x.shape[0], x.shape[-1] if depth is None else depth
    sx_r = 1 if depth is not None else (x.stride(1) if x.dim() == 3 else 0)
    block_b = row_block(B)
    rows = _cdiv(B, block_b) * block_b
    one = len(weights) == 1
    ws = list(weights) + [weights[0]] * (MAX_SEGMENTS - len(weights))
    mul = out if multiply is None else multiply
    cpu = interpreted() or x.device.type != "cuda"
    # interpreted, a one-segment product of 256 or more inputs splits K in 128-wide slices (up to 4):
    # the CPU tests run the split path too
    split = min(4, _cdiv(K, 128)) if cpu and one else 1
    # split K's scratch (`_scratch`) where a split may run; unused otherwise (any tensors: out, meta)
    scratch = lambda n_split: _scratch(x.device, rows, n_max, n_split) if one and n_split > 1 else (out, meta)  # noqa: E731
    head, tail = (x, x.stride(0), sx_r, out, out.stride(0), mul, mul.stride(0), meta, *ws), (B, K, n_max)
    precision = "ieee" if weights[0].dtype == torch.float32 else "tf32"  # (only fp32 operands read it)
    aligned = all(d % 16 == 0 for w in weights for d in w.shape)
    flags = dict(ACCUMULATE=accumulate, MULTIPLY=multiply is not None, PRECISION=precision, BLOCK_B=block_b,
                 ALIGNED=aligned)
    sizes = dict(n_max=n_max, segments=len(weights), K=K, B=B, block_b=block_b)
    rows_kw = dict(ACCUMULATE=accumulate, MULTIPLY=multiply is not None, ALIGNED=aligned)
    # several segments: the programs may start from the last segment's (a tile's REVERSED; interpreted,
    # always where SEGMENTS_REVERSED is set, so that the CPU tests run that order)
    several = len(weights) > 1 and SEGMENTS_REVERSED
    rows_args = (x, sx_r, out, mul, meta, *ws, K)
    # (one row: `_gemv_rows`, so that the CPU tests run it too, in the steps at batch 1; 128 outputs a
    # program: under Triton's interpreter a program's every operation costs, whatever its size)
    if cpu:
        if B == 1 and ROWS:
            _gemv_rows[(_cdiv(n_max, 128), len(weights))](*rows_args, **rows_kw, BLOCK_N=128, BLOCK_K=128, PDL=False,
                                                          REVERSED=several)
            return
        tile = dict(BLOCK_N=128, BLOCK_K=128, SPLIT=split)
        _gemv[_grid(**sizes, **tile)](*head, *scratch(split), *tail, UPCAST=True, **tile, **flags, PDL=False,
                                      REVERSED=several)
        return
    split_ok = one and SPLIT_K
    rows_ok = B == 1 and ROWS
    key = (str(x.device), K, block_b, accumulate, multiply is not None, n_max, len(weights), precision, split_ok,
           rows_ok, late)
    pdl = _pdl(x.device, late=late)

    def launch(cfg):
        kw = cfg.kwargs
        if kw.get("ROWS"):
            _gemv_rows[(_cdiv(n_max, kw["BLOCK_N"]), len(weights))](
                *rows_args, **rows_kw, BLOCK_N=kw["BLOCK_N"], BLOCK_K=kw["BLOCK_K"], REVERSED=kw.get("REVERSED", False),
                **pdl, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
            return
        grid = _grid(**sizes, **{k: kw[k] for k in _TILE})
        _gemv[grid](*head, *scratch(kw["SPLIT"]), *tail, UPCAST=False, **flags, **kw, **pdl, num_warps=cfg.num_warps,
                    num_stages=cfg.num_stages)

    if _RECORD is not None:  # `tune_step` is recording: this launch's kind, with the first config meanwhile
        configs = (_SPLIT_CONFIGS if split_ok else _GEMV_CONFIGS) + (_ROWS_CONFIGS if rows_ok else [])
        configs = [c for c in configs if precision != "ieee" or _small(c) or c.kwargs.get("ROWS")]
        if several:  # each tile in both orders
            configs += [triton.Config(dict(c.kwargs, REVERSED=True), num_warps=c.num_warps, num_stages=c.num_stages)
                        for c in configs]
        _RECORD.setdefault(key, {"configs": configs, "launches": []})["launches"].append(launch)
        launch(configs[0])
    elif key in _CHOSEN:
        launch(_CHOSEN[key])
    elif STEP_TUNING:  # a launch no step tuned, a prompt's (B T rows): one tile, built once and not timed
        launch(_UNTUNED[precision])
    else:  # Triton's autotuner picks, launch by launch (META: the arguments and the config's tile)
        tuned = _gemv_split_tuned if split_ok else _gemv_tuned
        grid = lambda META: _grid(**sizes, **{k: META[k] for k in _TILE})  # noqa: E731
        tuned[grid](*head, *scratch(MAX_SPLIT), *tail, UPCAST=False, **flags, PDL=False)


def _small(cfg) -> bool:
    """A `_gemv` config fp32 weights may use (no tensor cores, "ieee" products): small tiles, which compile
    fast. (`_gemv_rows` has no tensor cores to begin with: every one of its tiles may.)"""
    return cfg.kwargs["BLOCK_N"] * cfg.kwargs["BLOCK_K"] <= 4096 and cfg.kwargs["SPLIT"] <= 2


def _graph_us(fn, reps: int) -> float:
    """Microseconds a replay of fn() captured in a CUDA graph: the median of `reps` timings of three
    replays in a row, each behind an untimed replay (the GPU is busy with it while the host queues
    the timed ones, so a slow host, another process building kernels, is not timed as a gap)."""
    fn()  # (warm, outside the capture)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    times = []
    for _ in range(reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        g.replay()
        t0.record()
        for _ in range(3):
            g.replay()
        t1.record()
        t1.synchronize()
        times.append(t0.elapsed_time(t1) * 1e3 / 3)
    del g
    return sorted(times)[reps // 2]


def tune_step(step, reps: int = 5) -> dict:
    """Pick each product launch's tile and K split the way the step runs them: `step()` (one decode
    step on CUDA) is recorded once, its `_gemv` launches grouped by kind (the same shapes and flags:
    a layer's r/k/v, the second LoRA stages, O, the channel mix's key, its value, the head); then for
    each kind and each candidate config, all of the step's launches of that kind (one per layer, each
    reading its own matrix, so the cache holds none) are captured in a CUDA graph, replayed and timed
    (`_graph_us`); the fastest is kept for the process (`_CHOSEN`), for every later launch of that
    kind. (Timing each kind's three fastest again inside the whole captured step changed nothing on
    an H200: RWKV-7 b32 13,504 against 13,497 tok/s, RWKV-6 10,950 against 10,985; removed.)
    Triton's autotuner times one launch of one matrix at a time: at these
    sizes (5-25 us a launch) it picked tiles up to 2x slower than the best in a step
    (benchmarks/README.md). The step's outputs meanwhile are garbage (the caller restores the
    state). Returns {kind: (config, us a launch)}; `_TIMINGS` keeps every candidate's times."""
    global _RECORD
    _RECORD = {}
    try:
        step()
        recorded = _RECORD
    finally:
        _RECORD = None
    ranked = {}
    for key, rec in recorded.items():
        if key in _CHOSEN:
            continue
        launches = rec["launches"]
        timed = []
        for cfg in rec["configs"]:
            try:
                for launch in launches:  # compile (Triton's cache) and warm, outside the capture
                    launch(cfg)
                torch.cuda.synchronize()
            except Exception:  # (a tile this card cannot build or hold: the others compete)
                continue
            timed.append((cfg, _graph_us(lambda: [launch(cfg) for launch in launches], reps) / len(launches)))
        if timed:
            ranked[key] = sorted(timed, key=lambda t: t[1])
            _CHOSEN[key] = ranked[key][0][0]
            _TIMINGS[key] = [(_describe(c), round(us, 2)) for c, us in ranked[key]]
    return {key: (_describe(_CHOSEN[key]), next(us for c, us in timed if c is _CHOSEN[key])) for key, timed in ranked.items()}


def _describe(cfg) -> dict:
    return dict(cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)


# ------------------------------------------------------------------------------------------ the step
STEPS = ("rwkv7_world", "rwkv6_world", "rwkv5_world", "rwkv4_world")  # every version has a Triton step
# triton_decode None picks it for every version: on an H200 (1.5B shape, benchmarks/decode_step.py,
# back to back on one card, session 14) it beats the compiled step for each, b1 / b32 tok/s: v4 743 /
# 20,563 against 696 / 17,609, v5.2 704 / 17,131 against 594 / 12,764, v6 521 / 11,019 against 500 /
# 10,785 (RWKV-7's has been the default since session 8)


def supports(model) -> str:
    """'' where `triton_step` can run `model` (a causal LM of ours), else why not."""
    config = model.config
    if not HAVE_TRITON:
        return "Triton is not installed"
    if config.model_type not in STEPS:
        return f"no Triton step for {config.model_type}"
    if getattr(config, "deep_embed_size", 0):
        return "DeepEmbed RWKV-7"
    if config.model_type != "rwkv4_world" and config.head_size & (config.head_size - 1):
        return f"head size {config.head_size} is not a power of two"
    if getattr(config, "rescale_every", 0) > 0 and model.get_input_embeddings().weight.dtype == torch.float16:
        return "RWKV-4 to 6 in fp16 rescale their layers on the fly"
    return ""


class Plan(NamedTuple):
    """What the kernels need besides the weights, made once per decoder (before a graph is captured):
    each product launch's segment table, on the model's device, and the sizes."""

    version: str
    width: int  # of buf: the time mix's products and LoRA first stages, fp32
    offsets: tuple  # where the LoRA first stages start in buf
    dims: tuple  # their widths
    metas: dict  # product launch -> its segment table


def _matrices(version: str, a, f) -> tuple:
    """A layer's matrices, which the products read (each must be in the embedding's dtype)."""
    common = (a.receptance.weight, a.key.weight, a.value.weight, a.output.weight, f.key.weight, f.value.weight,
              f.receptance.weight if version != "rwkv7_world" else f.key.weight)
    if version == "rwkv7_world":
        return common + (a.w1, a.a1, a.v1, a.g1)
    if version == "rwkv6_world":
        return common + (a.gate.weight, a.time_maa_w1, a.time_maa_w2, a.time_decay_w1, a.time_decay_w2)
    return common + ((a.gate.weight,) if getattr(a, "gated", False) else ())


def segment_table(rows, K: int, device) -> Tensor:
    """`_gemv`'s segment table: one row (N, input row, output offset, activation, layout 0 [N, K] /
    1 [K, N][, K_s]) per segment; K_s, where a row leaves it out, is K."""
    return torch.tensor([(*r, K) if len(r) == META_FIELDS - 1 else r for r in rows], dtype=torch.int32, device=device)


def make_plan(model) -> Plan:
    why = supports(model)
    if why:
        raise ValueError(f"the Triton decode step does not run this model: {why}")
    body = model.model
    version = model.config.model_type
    blk0 = body.blocks[0]
    att0 = blk0.att
    C, Fw, V = model.config.hidden_size, blk0.ffn.key.weight.shape[0], model.lm_head.weight.shape[0]
    A = att0.key.weight.shape[0]  # (RWKV-4's attention width; C elsewhere)
    dims = {"rwkv7_world": lambda: tuple(getattr(att0, n).shape[1] for n in ("w1", "a1", "v1", "g1")),
            "rwkv6_world": lambda: (att0.time_decay_w1.shape[1],)}.get(version, tuple)()
    dtype = body.emb.weight.dtype
    weights = [t for blk in body.blocks for t in _matrices(version, blk.att, blk.ffn)] + [model.lm_head.weight]
    if any(t.dtype != dtype or not t.is_contiguous() for t in weights):
        raise ValueError("the Triton decode step needs every matrix contiguous and in the embedding's dtype")
    offs, o = [], {"rwkv7_world": 3 * C, "rwkv4_world": 3 * A}.get(version, 4 * C)
    for d in dims:
        offs.append(o)
        o += d
    dev = body.emb.weight.device
    # K, which only layout 1 reads: the input's width, but for the second LoRA stages, whose inputs
    # (`offs`) lie side by side in buf
    table = lambda rows, K: segment_table(rows, K, dev)  # noqa: E731
    metas = {"c": table([(C, 0, 0, ACT_NONE, 0)], C), "vocab": table([(V, 0, 0, ACT_NONE, 0)], C),
             # the v4-v6 channel mix, input rows xk xr: relu(xk K)^2 | sigmoid(xr R)
             "ffn": table([(Fw, 0, 0, ACT_RELU2, 0), (C, 1, Fw, ACT_SIGMOID, 0)], C)}
    if version == "rwkv7_world":  # input rows: xr xw xk xv xa xg
        metas["in"] = table([(C, 0, 0, ACT_NONE, 0), (C, 2, C, ACT_NONE, 0), (C, 3, 2 * C, ACT_NONE, 0),
                             (dims[0], 1, offs[0], ACT_TANH, 1), (dims[1], 4, offs[1], ACT_NONE, 1),
                             (dims[2], 3, offs[2], ACT_NONE, 1), (dims[3], 5, offs[3], ACT_SIGMOID, 1)], C)
        metas["ffn"] = table([(Fw, 0, 0, ACT_RELU2, 0)], C)
        # the second LoRA stages apart (`_step7`, larger batches): input "rows" are buf's offsets
        metas["lora2"] = table([(C, o, j * C, ACT_NONE, 1, d) for j, (o, d) in enumerate(zip(offs, dims))], max(dims))
    elif version == "rwkv6_world":  # input rows: xw xk xv xr xg
        metas["maa"] = table([(att0.time_maa_w1.shape[1], 0, 0, ACT_TANH, 1)], C)
        metas["in"] = table([(C, 3, 0, ACT_NONE, 0), (C, 1, C, ACT_NONE, 0), (C, 2, 2 * C, ACT_NONE, 0),
                             (C, 4, 3 * C, ACT_SILU, 0), (dims[0], 0, offs[0], ACT_TANH, 1)], C)
    elif version == "rwkv5_world":  # input rows: xr xk xv [xg]
        metas["in"] = table([(C, 0, 0, ACT_NONE, 0), (C, 1, C, ACT_NONE, 0), (C, 2, 2 * C, ACT_NONE, 0),
                             (C, 3, 3 * C, ACT_SILU, 0)][: 4 if att0.gated else 3], C)
    else:  # RWKV-4, input rows: xk xv xr
        metas["in"] = table([(A, 0, 0, ACT_NONE, 0), (A, 1, A, ACT_NONE, 0), (A, 2, 2 * A, ACT_SIGMOID, 0)], C)
    return Plan(version, o, tuple(offs), dims, metas)


def _padding(mask: Optional[Tensor], x: Tensor) -> dict:
    """A launch's padding arguments: `mask` [B T] (int8, 0 for padding), or None (no padding)."""
    return {"mask_ptr": x if mask is None else mask, "HAS_MASK": mask is not None}


def _norm_mix_call(x: Tensor, ln, shift, mixes, out: Tensor, ln0=None, hx: Optional[Tensor] = None, form: int = 0,
                   T: int = 1, mask: Optional[Tensor] = None) -> None:
    """`_norm_mix` over the rows of x [B T, C] (T tokens a row in turn, `mask` [B T]: padding where 0):
    ln (after ln0, if given, whose output replaces x), the token shift through `shift` and `mixes` (up
    to six coefficient vectors, `form` 0 or 1 as `_mix_out`; none: out = ln(x))."""
    B, C = x.shape[0] // T, x.shape[1]
    block_c = _pow2(C)
    first = ln if ln0 is None else ln0
    ms = list(mixes) + [ln.weight] * (6 - len(mixes))
    _norm_mix[(B,)](x, first.weight, first.bias, ln.weight, ln.bias, x if shift is None else shift, *ms, out,
                    out if hx is None else hx, C, ln.eps, T, HAS_LN0=ln0 is not None, N_MIX=len(mixes), MIX_FORM=form,
                    SAVE_HX=hx is not None, BLOCK_C=block_c, num_warps=min(16, max(4, block_c // 256)),
                    **_padding(mask, x), **_pdl(x.device))


def _late(plan: Plan, rows: int) -> bool:
    """Whether a product of `rows` rows lets the next launch start at its end (PDL_LATE_ROWS)."""
    return rows <= PDL_LATE_ROWS and plan.version in PDL_LATE_VERSIONS


def _head_warps(rows: int) -> int:
    return HEAD_WARPS or (8 if rows < LORA_APART_FROM else 4)


def _lora_block(dims) -> int:
    return max(16, _pow2(max(dims, default=1)))


def _head(model, x: Tensor, plan: Plan) -> Tensor:
    """ln_out and the LM head for x [B, C]: logits [B, V] in the model's dtype."""
    xn, late = torch.empty_like(x), _late(plan, x.shape[0])
    _norm_mix_call(x, model.model.ln_out, None, [], xn)
    head = model.lm_head.weight
    logits = x.new_empty(x.shape[0], head.shape[0])
    _gemv_call(xn, logits, plan.metas["vocab"], [head], head.shape[0], late=late)
    return logits


def _channel_mix(x: Tensor, blk, shift: Tensor, plan: Plan, form: int, T: int, mask: Optional[Tensor]) -> None:
    """The channel mix of v4-v6: x += sigmoid(xr R) * (relu(xk K)^2 V) (v6's mixes: `form` 0)."""
    ffn = blk.ffn
    B, C = x.shape
    Fw, late = ffn.key.weight.shape[0], _late(plan, B)
    mixes = [ffn.time_maa_k, ffn.time_maa_r] if form == 0 else [ffn.time_mix_k, ffn.time_mix_r]
    fx, fbuf = x.new_empty(B, 2, C), x.new_empty(B, Fw + C)  # [xk, xr]; [relu(xk K)^2 | sigmoid(xr R)]
    _norm_mix_call(x, blk.ln2, shift, mixes, fx, form=form, T=T, mask=mask)
    _gemv_call(fx, fbuf, plan.metas["ffn"], [ffn.key.weight, ffn.receptance.weight], Fw, late=late)
    _gemv_call(fbuf[:, :Fw], x, plan.metas["c"], [ffn.value.weight], C, accumulate=True, multiply=fbuf[:, Fw:],
               late=late)


def _step7(model, x: Tensor, states: list, plan: Plan, T: int, mask: Optional[Tensor]) -> None:
    B, C = x.shape  # (B: rows, T tokens each)
    late = _late(plan, B)
    dw, da, dv, dg = plan.dims
    xs, yg, fk = x.new_empty(B, 6, C), x.new_empty(B, C), x.new_empty(B, 1, C)
    buf = torch.empty(B, plan.width, device=x.device, dtype=torch.float32)
    v_first = torch.empty(B, C, device=x.device, dtype=torch.float32)
    hidden = x.new_empty(B, model.model.blocks[0].ffn.key.weight.shape[0])  # relu(xk K)^2
    apart = B >= LORA_APART_FROM
    lo = torch.empty(B, 4 * C, device=x.device, dtype=torch.float32) if apart else buf  # (unread unless apart)
    for i, blk in enumerate(model.model.blocks):
        att, ffn = blk.att, blk.ffn
        att_shift, S, ffn_shift = states[i]
        _norm_mix_call(x, blk.ln1, att_shift, [att.x_r, att.x_w, att.x_k, att.x_v, att.x_a, att.x_g], xs,
                       ln0=blk.ln0 if i == 0 else None, T=T, mask=mask)
        _gemv_call(xs, buf, plan.metas["in"], [att.receptance.weight, att.key.weight, att.value.weight, att.w1, att.a1,
                                               att.v1, att.g1], C, late=late)
        if apart:
            _gemv_call(buf, lo, plan.metas["lora2"], [att.w2, att.a2, att.v2, att.g2], C, depth=max(plan.dims),
                       late=late)
        H, N = att.r_k.shape
        _wkv7_head[(B // T, H)](buf, buf.stride(0), C, H, *plan.offsets, att.w2, att.a2, att.v2, att.g2, dw, da, dv, dg,
                                att.w0, att.a0, att.v0, att.k_k, att.k_a, att.r_k, att.ln_x.weight, att.ln_x.bias,
                                att.ln_x.eps, DECAY_SCALE, S, v_first, yg, lo, T, FIRST=i == 0, N=N,
                                **dict(zip(("BW", "BA", "BV", "BG"), map(_lora_block, ((d,) for d in plan.dims)))),
                                APART=apart, num_warps=_head_warps(B), **_padding(mask, x),
                                **_pdl(x.device))
        _gemv_call(yg, x, plan.metas["c"], [att.output.weight], C, accumulate=True, late=late)
        _norm_mix_call(x, blk.ln2, ffn_shift, [ffn.x_k], fk, T=T, mask=mask)
        _gemv_call(fk, hidden, plan.metas["ffn"], [ffn.key.weight], hidden.shape[1], late=late)
        _gemv_call(hidden, x, plan.metas["c"], [ffn.value.weight], C, accumulate=True, late=late)


def _step6(model, x: Tensor, states: list, plan: Plan, T: int, mask: Optional[Tensor]) -> None:
    B, C = x.shape
    late = _late(plan, B)
    f32 = dict(device=x.device, dtype=torch.float32)
    blocks = model.model.blocks
    d_mix = blocks[0].att.time_maa_w2.shape[1]
    hx, hid = torch.empty(B, 2, C, **f32), torch.empty(B, 5 * d_mix, **f32)
    buf = torch.empty(B, plan.width, **f32)
    xxx, xs, yg = x.new_empty(B, 1, C), x.new_empty(B, 5, C), x.new_empty(B, C)
    block_c = V6_MIX_BLOCK
    for i, blk in enumerate(blocks):
        att = blk.att
        att_shift, S, ffn_shift = states[i]
        _norm_mix_call(x, blk.ln1, att_shift, [att.time_maa_x], xxx, ln0=blk.ln0 if i == 0 else None, hx=hx, T=T,
                       mask=mask)
        _gemv_call(xxx, hid, plan.metas["maa"], [att.time_maa_w1], hid.shape[1], late=late)
        _v6_mixes[(B, _cdiv(C, block_c))](hid, att.time_maa_w2, hx, att.time_maa_w, att.time_maa_k, att.time_maa_v,
                                          att.time_maa_r, att.time_maa_g, xs, C, d_mix, BLOCK_C=block_c,
                                          BLOCK_D=_lora_block((d_mix,)), num_warps=4, **_pdl(x.device))
        _gemv_call(xs, buf, plan.metas["in"], [att.receptance.weight, att.key.weight, att.value.weight, att.gate.weight,
                                               att.time_decay_w1], C, late=late)
        H, N = att.time_faaaa.shape
        _wkv5_head[(B // T, H)](buf, buf.stride(0), C, H, plan.offsets[0], att.time_decay_w2, plan.dims[0],
                                att.time_decay, att.time_faaaa, att.ln_x.weight, att.ln_x.bias, att.ln_x.eps, S, yg, T,
                                N=N, BLOCK_D=_lora_block(plan.dims), DECAY_LORA=True, PER_HEAD=False, GATED=True,
                                num_warps=_head_warps(B), **_padding(mask, x), **_pdl(x.device))
        _gemv_call(yg, x, plan.metas["c"], [att.output.weight], C, accumulate=True, late=late)
        _channel_mix(x, blk, ffn_shift, plan, form=0, T=T, mask=mask)


def _step5(model, x: Tensor, states: list, plan: Plan, T: int, mask: Optional[Tensor]) -> None:
    B, C = x.shape
    late = _late(plan, B)
    buf = torch.empty(B, plan.width, device=x.device, dtype=torch.float32)
    yg = x.new_empty(B, C)
    gated = model.model.blocks[0].att.gated
    xs = x.new_empty(B, 4 if gated else 3, C)
    for i, blk in enumerate(model.model.blocks):
        att = blk.att
        att_shift, S, ffn_shift = states[i]
        mixes = [att.time_mix_r, att.time_mix_k, att.time_mix_v] + ([att.time_mix_g] if gated else [])
        _norm_mix_call(x, blk.ln1, att_shift, mixes, xs, ln0=blk.ln0 if i == 0 else None, form=1, T=T, mask=mask)
        mats = [att.receptance.weight, att.key.weight, att.value.weight] + ([att.gate.weight] if gated else [])
        _gemv_call(xs, buf, plan.metas["in"], mats, C, late=late)
        per_head = att.version != "5.2"
        H, N = att.n_head, att.head_size
        _wkv5_head[(B // T, H)](buf, buf.stride(0), C, H, 0, att.time_decay, 1, att.time_decay,
                                att.time_first if per_head else att.time_faaaa, att.ln_x.weight, att.ln_x.bias, att.ln_x.eps,
                                S, yg, T, N=N, BLOCK_D=16, DECAY_LORA=False, PER_HEAD=per_head, GATED=gated,
                                num_warps=_head_warps(B), **_padding(mask, x), **_pdl(x.device))
        _gemv_call(yg, x, plan.metas["c"], [att.output.weight], C, accumulate=True, late=late)
        _channel_mix(x, blk, ffn_shift, plan, form=1, T=T, mask=mask)


def _step4(model, x: Tensor, states: list, plan: Plan, T: int, mask: Optional[Tensor]) -> None:
    B, C = x.shape
    late = _late(plan, B)
    A = model.model.blocks[0].att.key.weight.shape[0]
    buf = torch.empty(B, plan.width, device=x.device, dtype=torch.float32)
    xs, ry = x.new_empty(B, 3, C), x.new_empty(B, A)
    block = 256
    for i, blk in enumerate(model.model.blocks):
        att = blk.att
        att_shift, (aa, bb, pp), ffn_shift = states[i]
        _norm_mix_call(x, blk.ln1, att_shift, [att.time_mix_k, att.time_mix_v, att.time_mix_r], xs,
                       ln0=blk.ln0 if i == 0 else None, form=1, T=T, mask=mask)
        _gemv_call(xs, buf, plan.metas["in"], [att.key.weight, att.value.weight, att.receptance.weight], A, late=late)
        _wkv4[(B // T, _cdiv(A, block))](buf, buf.stride(0), A, att.time_decay, att.time_first, aa, bb, pp, ry,
                                         T, BLOCK=block, **_padding(mask, x), **_pdl(x.device), num_warps=4)
        _gemv_call(ry, x, plan.metas["c"], [att.output.weight], C, accumulate=True, late=late)
        _channel_mix(x, blk, ffn_shift, plan, form=1, T=T, mask=mask)


_STEP_FNS = {"rwkv7_world": _step7, "rwkv6_world": _step6, "rwkv5_world": _step5, "rwkv4_world": _step4}


def triton_step(model, ids: Tensor, states: list, plan: Plan, mask: Optional[Tensor] = None) -> Tensor:
    """ids [B, T] (a decode step: T = 1) through the whole model from `states` (each block's
    (att_shift, wkv, ffn_shift), updated in place), each launch taking every row's T tokens (the
    products as B T rows, the recurrences a row's tokens in turn): the last token's logits [B, V] in
    the model's dtype. `mask` [B, T] (bool; a prompt's, whose last column is real): padding where
    False, which changes no state, as in the modules."""
    B, T = ids.shape
    x = F.embedding(ids.reshape(-1), model.model.emb.weight)  # [B T, C], a fresh tensor: the residual stream
    if mask is not None:
        mask = mask.reshape(-1).to(torch.int8)
    _STEP_FNS[plan.version](model, x, states, plan, T, mask)
    return _head(model, x if T == 1 else x[T - 1 :: T].contiguous(), plan)
