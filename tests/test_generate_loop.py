"""generate()'s own loop (rwkv_generate.decode_loop) against transformers' `_sample` loop, which the
same call runs when `rwkv_paths.own_generate_loop` is made to say no: the same tokens (greedy, and
sampled with a seed), the same place to stop, the same cache and random generator afterwards, the
same streamer calls; and everything the loop does not do really goes to transformers."""

from __future__ import annotations

import contextlib

import pytest
import torch
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer, TextStreamer

from rwkv_hf.modeling import rwkv_common, rwkv_generate
from rwkv_hf.modeling.rwkv_cache import CACHE_FIELD
from rwkv_hf.testing import build_model, make_state_dict, transformers_generate_loop

VERSIONS = ["4", "5.2", "6", "7"]
VOCAB = 512
_MODELS = {}


def model_for(version: str, vocab: int = VOCAB, **kw):
    key = (version, vocab, tuple(sorted(kw.items())))
    if key not in _MODELS:
        _MODELS[key] = build_model(make_state_dict(version, n_layer=2, n_embd=64, vocab_size=vocab, seed=11, **kw))
    return _MODELS[key]


def padded_batch(vocab: int = VOCAB, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (3, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    mask[2, :1] = 0
    return ids.masked_fill(mask == 0, 0), mask


@pytest.fixture
def own_calls(monkeypatch):
    """How many generate() calls ran our loop (and how many transformers' `_sample`)."""
    calls = {"own": 0, "transformers": 0}
    real_own, real_sample = rwkv_common.decode_loop, GenerationMixin._sample

    def own(*a, **k):
        calls["own"] += 1
        return real_own(*a, **k)

    def theirs(*a, **k):
        calls["transformers"] += 1
        return real_sample(*a, **k)

    monkeypatch.setattr(rwkv_common, "decode_loop", own)
    monkeypatch.setattr(GenerationMixin, "_sample", theirs)
    return calls


@pytest.fixture(params=[1, 4], ids=["look-every-step", "look-every-4"])
def every(request, monkeypatch):
    """How often the loop looks at the device on CPU; 4 makes it run past the end and undo (as on CUDA)."""
    monkeypatch.setitem(rwkv_generate.STOP_CHECK_EVERY, "cpu", request.param)
    return request.param


def both(model, seed=None, **kw):
    """(transformers' result, ours, random numbers drawn after each) of one generate() call."""
    out = []
    for ctx in (transformers_generate_loop(), contextlib.nullcontext()):
        with ctx:
            if seed is not None:
                torch.manual_seed(seed)
            result = model.generate(**kw)
            out.append((result, torch.rand(3)))
    (theirs, after_theirs), (ours, after_ours) = out
    return theirs, ours, after_theirs, after_ours


def states(cache):
    return [t for layer in cache.layers_state for t in (layer if isinstance(layer[1], torch.Tensor) else (layer[0], *layer[1], layer[2]))]


def assert_same_cache(a, b):
    assert a.seen_tokens == b.seen_tokens
    for x, y in zip(states(a), states(b)):
        assert torch.equal(x, y)


# --------------------------------------------------------------------------------------------- greedy
@pytest.mark.parametrize("version", VERSIONS)
def test_greedy_padded_batch_and_continued_cache(version, own_calls, every):
    """Greedy on a left-padded batch: transformers' tokens; the returned cache is transformers' (the
    state after every token but the last), and continuing from it gives transformers' tokens again."""
    model = model_for(version)
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=9, do_sample=False, pad_token_id=0, eos_token_id=None,
              return_dict_in_generate=True)
    theirs, ours, _, _ = both(model, **kw)
    assert own_calls == {"own": 1, "transformers": 1}
    assert torch.equal(theirs.sequences, ours.sequences) and ours.sequences.shape == (3, 7 + 9)
    assert len(set(ours.sequences[:, 7:].flatten().tolist())) > 3  # tokens that vary
    cache_theirs, cache_ours = getattr(theirs, CACHE_FIELD), getattr(ours, CACHE_FIELD)
    assert cache_ours.seen_tokens == 7 + 9 - 1
    assert_same_cache(cache_theirs, cache_ours)
    # the conversation goes on from each cache, with the whole sequence and two more tokens
    more = torch.cat([ours.sequences, torch.full((3, 2), 5)], 1)
    more_mask = torch.cat([mask, torch.ones(3, 11, dtype=mask.dtype)], 1)
    kw2 = dict(attention_mask=more_mask, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
    with transformers_generate_loop():
        again_theirs = model.generate(more, **{CACHE_FIELD: cache_theirs}, **kw2)
    again_ours = model.generate(more, **{CACHE_FIELD: cache_ours}, **kw2)
    assert torch.equal(again_theirs, again_ours)
    assert_same_cache(cache_theirs, cache_ours)
    assert own_calls == {"own": 2, "transformers": 2}


def test_long_generation(own_calls):
    """600 new tokens (the loop's buffer grows twice on the way) and a limit far past where EOS comes."""
    model = model_for("7")
    ids, _ = padded_batch()
    theirs, ours, _, _ = both(model, input_ids=ids[1:2], max_new_tokens=600, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(theirs, ours) and ours.shape == (1, 607)
    eos = ours[0, 7 + 20].item()
    first = ours[0, 7:].tolist().index(eos)
    theirs, ours, _, _ = both(model, input_ids=ids[1:2], max_new_tokens=10**9, do_sample=False, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(theirs, ours) and ours.shape == (1, 7 + first + 1)
    assert own_calls == {"own": 2, "transformers": 2}


def test_deepembed_greedy(own_calls):
    model = model_for("7", deep_embed=32)
    ids, mask = padded_batch()
    theirs, ours, _, _ = both(model, input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs, ours) and own_calls["own"] == 1


# ------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("version", VERSIONS)
def test_sampling_with_a_seed(version, own_calls, every):
    """Sampling with transformers' processors: the same tokens for the same seed, and the generator
    left where transformers' draws leave it (the next random numbers agree too)."""
    model = model_for(version)
    ids, mask = padded_batch()
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=True, temperature=0.9, top_k=40, top_p=0.9,
              min_p=0.01, repetition_penalty=1.3, pad_token_id=0)
    theirs, ours, after_theirs, after_ours = both(model, seed=7, **kw)
    assert own_calls == {"own": 1, "transformers": 1}
    assert torch.equal(theirs, ours)
    assert torch.equal(after_theirs, after_ours)
    torch.manual_seed(8)
    assert not torch.equal(model.generate(**kw), ours)  # the seed matters


def test_several_sequences_per_prompt(own_calls):
    model = model_for("7")
    ids, mask = padded_batch()
    theirs, ours, _, _ = both(model, seed=3, input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                              num_return_sequences=2, pad_token_id=0)
    assert torch.equal(theirs, ours) and ours.shape == (6, 13) and own_calls["own"] == 1


# ------------------------------------------------------------------------------------------- stopping
def _eos_per_row(model, ids, mask, seed, at=(2, 5, None), **kw):
    """Tokens that each row generates first at step `at[row]` (None: a row that never stops)."""
    torch.manual_seed(seed)
    free = model.generate(ids, attention_mask=mask, pad_token_id=0, eos_token_id=None, **kw)[:, ids.shape[1]:].tolist()
    eos = []
    for row, step in zip(free, at):
        if step is not None:
            candidates = [t for t in set(row[step:step + 1]) if t not in row[:step]]
            eos += candidates
    banned = {t for row, step in zip(free, at) if step is None for t in row}
    return [t for t in eos if t not in banned]


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
@pytest.mark.parametrize("version", ["5.2", "7"])
def test_eos_in_the_middle(version, do_sample, own_calls, every):
    """Some rows reach an EOS token part way: they are padded after it; when all rows have finished
    the result ends where transformers' does, and a cache that outlives the call is transformers'."""
    model = model_for(version)
    ids, mask = padded_batch(seed=2)
    kw = dict(max_new_tokens=12, do_sample=do_sample)
    seed = 4
    # rows 0 and 1 stop at steps 2 and 5, row 2 runs on
    eos = _eos_per_row(model, ids, mask, seed, **kw)
    assert eos, "the synthetic model repeats itself too early for this test"
    theirs, ours, after_theirs, after_ours = both(model, seed=seed, input_ids=ids, attention_mask=mask, pad_token_id=1,
                                                  eos_token_id=eos, return_dict_in_generate=True, **kw)
    assert torch.equal(theirs.sequences, ours.sequences)
    new = ours.sequences[:, 7:].tolist()
    assert any(1 in r for r in new)  # a row was padded after its EOS
    assert torch.equal(after_theirs, after_ours)
    assert_same_cache(getattr(theirs, CACHE_FIELD), getattr(ours, CACHE_FIELD))
    # every row stops: the result is cut where transformers' is
    eos_all = _eos_per_row(model, ids, mask, seed, at=(2, 5, 3), **kw)
    theirs, ours, after_theirs, after_ours = both(model, seed=seed, input_ids=ids, attention_mask=mask, pad_token_id=1,
                                                  eos_token_id=eos_all, return_dict_in_generate=True, **kw)
    assert torch.equal(theirs.sequences, ours.sequences) and ours.sequences.shape[1] < 7 + 12
    assert every == 1 or (ours.sequences.shape[1] - 7) % every  # (steps past the end were undone)
    assert torch.equal(after_theirs, after_ours)
    assert_same_cache(getattr(theirs, CACHE_FIELD), getattr(ours, CACHE_FIELD))
    assert own_calls == {"own": 4, "transformers": 2}  # (two free runs to find the EOS tokens)


def test_min_new_tokens(own_calls, every):
    model = model_for("6")
    ids, mask = padded_batch(seed=2)
    eos = _eos_per_row(model, ids, mask, 0, at=(1, 1, 1), max_new_tokens=8, do_sample=False)
    kw = dict(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=1, eos_token_id=eos)
    theirs, ours, _, _ = both(model, **kw)
    assert torch.equal(theirs, ours) and ours.shape[1] < 7 + 8
    theirs, ours, _, _ = both(model, min_new_tokens=6, **kw)
    assert torch.equal(theirs, ours) and ours.shape[1] >= 7 + 6
    assert own_calls["own"] == 3  # (the free run included)


# ------------------------------------------------------------------------------- text: streamer, stops
@pytest.fixture(scope="module")
def world():
    """A RWKV-7 with the World vocabulary and its fast tokenizer (built once: seconds)."""
    from rwkv_hf.tokenization import RwkvWorldTokenizerFast

    return model_for("7", vocab=65536), RwkvWorldTokenizerFast()


class Recorder(BaseStreamer):
    def __init__(self):
        self.calls = []

    def put(self, value):
        self.calls.append(value.tolist())

    def end(self):
        self.calls.append("end")


class TextRecorder(TextStreamer):
    def __init__(self, tokenizer):
        super().__init__(tokenizer, skip_prompt=True)
        self.text = []

    def on_finalized_text(self, text, stream_end=False):
        self.text.append(text)


@pytest.mark.parametrize("stop", [False, True], ids=["to-the-limit", "eos"])
def test_streamer(world, own_calls, every, stop):
    """A streamer gets the same calls (the prompt, then one `put` per new token, then `end`) and the
    same text; with an EOS part way, nothing past it."""
    model, tok = world
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    kw = dict(max_new_tokens=10, do_sample=True, pad_token_id=0, eos_token_id=None)
    if stop:
        torch.manual_seed(1)
        row = model.generate(ids, **kw)[0, ids.shape[1]:].tolist()
        kw["eos_token_id"] = row[5]
    got = []
    for ctx in (transformers_generate_loop(), contextlib.nullcontext()):
        with ctx:
            rec, text = Recorder(), TextRecorder(tok)
            torch.manual_seed(1)
            model.generate(ids, streamer=rec, **kw)
            torch.manual_seed(1)
            model.generate(ids, streamer=text, **kw)
            got.append((rec.calls, "".join(text.text)))
    assert got[0] == got[1]
    calls, text = got[1]
    assert len(calls) == 1 + (row.index(row[5]) + 1 if stop else 10) + 1 and calls[-1] == "end" and text
    assert own_calls == {"own": 2 + stop, "transformers": 2}


def test_wkv_mode_argument_reaches_the_steps(monkeypatch, own_calls):
    """generate(wkv_mode=...) runs our loop, its steps in that form, with transformers' tokens."""
    model = model_for("6")
    ids, mask = padded_batch()
    forms = []
    real = rwkv_generate.step_logits
    monkeypatch.setattr(rwkv_generate, "step_logits",
                        lambda m, i, c, path, *dtype: forms.append(path.wkv) or real(m, i, c, path, *dtype))
    theirs, ours, _, _ = both(model, input_ids=ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0,
                              wkv_mode="chunk")
    assert torch.equal(theirs, ours) and own_calls["own"] == 1 and forms == ["chunk"] * 3


def test_stop_strings(world, own_calls, every):
    """`stop_strings` (transformers' criterion on the device) stop where transformers stops."""
    model, tok = world
    ids = tok("The quick brown fox", return_tensors="pt").input_ids
    free = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    text = tok.decode(free[0, ids.shape[1] + 4: ids.shape[1] + 6])
    stop = text.strip()[:2] or text[:2]
    kw = dict(input_ids=ids, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0, stop_strings=[stop],
              tokenizer=tok)
    theirs, ours, _, _ = both(model, **kw)
    assert torch.equal(theirs, ours) and ours.shape[1] < ids.shape[1] + 12
    assert own_calls["own"] == 2  # (the first free run included)


# ----------------------------------------------------------------------------------------- fallbacks
class AddOne(LogitsProcessor):
    def __call__(self, input_ids, scores):
        return scores + 1


class Never(StoppingCriteria):
    def __call__(self, input_ids, scores, **kwargs):
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


FALLBACKS = {
    "scores asked for": dict(output_scores=True, return_dict_in_generate=True),
    "logits asked for": dict(output_logits=True, return_dict_in_generate=True),
    "hidden states asked for": dict(output_hidden_states=True, return_dict_in_generate=True),
    "a user's logits processor": dict(logits_processor=LogitsProcessorList([AddOne()])),
    "a user's stopping criterion": dict(stopping_criteria=StoppingCriteriaList([Never()])),
    "prefix_allowed_tokens_fn": dict(prefix_allowed_tokens_fn=lambda b, ids: list(range(10))),
    "max_time": dict(max_time=100.0),
    "no cache": dict(use_cache=False),
}


@pytest.mark.parametrize("case", list(FALLBACKS))
def test_falls_back_to_transformers(case, own_calls):
    model = model_for("7")
    ids, mask = padded_batch()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0, **FALLBACKS[case])
    assert own_calls == {"own": 0, "transformers": 1}
    assert (out if isinstance(out, torch.Tensor) else out.sequences).shape == (3, 10)


def test_falls_back_for_embeddings_hooks_and_beams(own_calls):
    model = model_for("7")
    ids, _ = padded_batch()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0)
    model.generate(inputs_embeds=model.get_input_embeddings()(ids), **kw)
    assert own_calls == {"own": 0, "transformers": 1}
    handle = model.model.blocks[0].register_forward_hook(lambda *a: None)  # a decode step stays in the modules
    try:
        model.generate(ids, **kw)
    finally:
        handle.remove()
    assert own_calls == {"own": 0, "transformers": 2}
    model.generate(ids, num_beams=2, **kw)  # (beam search is not `_sample`)
    assert own_calls == {"own": 0, "transformers": 2}
    model.generate(ids, **kw)
    assert own_calls == {"own": 1, "transformers": 2}


# ------------------------------------------------------------------------------------- as remote code
REMOTE = r"""
import sys, json, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
common = sys.modules[type(model).__module__.rsplit(".", 1)[0] + ".rwkv_common"]
calls, real = [], common.decode_loop
common.decode_loop = lambda *a, **k: calls.append(1) or real(*a, **k)
ids = torch.tensor(json.loads(sys.argv[2]))
out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None)
print(json.dumps({"calls": len(calls), "module": real.__module__, "out": out.tolist()}))
"""


def test_own_loop_runs_as_remote_code(tmp_path):
    """A saved folder loaded with trust_remote_code where rwkv_hf is not installed carries the loop
    (transformers 4.57 copies only the files the model file imports) and generate() runs it."""
    import json

    from rwkv_hf.testing import run_without_rwkv_hf

    model = model_for("7")
    model.save_pretrained(tmp_path / "m")
    ids, _ = padded_batch()
    proc = run_without_rwkv_hf(REMOTE, [tmp_path / "m", json.dumps(ids.tolist())], cwd=tmp_path,
                               env={"HF_MODULES_CACHE": str(tmp_path / "mods"), "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["calls"] == 1 and got["module"].startswith("transformers_modules.")
    assert got["out"] == model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0, eos_token_id=None).tolist()
