"""What transformers expects of a causal LM, beyond its common tests (`test_transformers_common.py`):
generation from `inputs_embeds`, outputs asked for through generate() or the config, tied embeddings,
the loss that `Trainer` relies on under gradient accumulation, dtypes, and what `rwkv-hf demo` reports.
Small random models (vocab 99, width 32, 2 layers), every version.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationMixin

import rwkv_hf  # noqa: F401  (registers the Auto classes)
from rwkv_hf.modeling import FAMILIES

VERSIONS = ("4", "5.2", "6", "7")


def small_config(version: str, **kw):
    family = int(version[0])
    extra = {"5": {"rwkv_version": version}, "6": {"mix_lora": 8, "decay_lora": 8},
             "7": {"decay_lora": 8, "a_lora": 8, "v_lora": 8, "gate_lora": 8}}.get(version[0], {})
    return FAMILIES[family][0](vocab_size=99, hidden_size=32, num_hidden_layers=2, intermediate_size=64, head_size=8,
                               **extra, **kw)


def small_model(version: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return FAMILIES[int(version[0])][2](small_config(version, **kw)).eval()


IDS = torch.tensor([[5, 17, 42, 3, 88, 9, 61], [70, 2, 33, 33, 14, 50, 8]])


# ------------------------------------------------------------------------ 1: generate(inputs_embeds=)
@pytest.mark.parametrize("version", VERSIONS)
def test_generate_from_inputs_embeds_equals_from_ids(version):
    """Greedy and beam search from the prompt's embeddings give the tokens generated from its ids
    (input_ids then hold only the generated tokens: the cache, not input_ids, knows the prompt)."""
    model = small_model(version)
    embeds = model.get_input_embeddings()(IDS)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        for extra in ({}, {"num_beams": 2}):
            from_ids = model.generate(IDS, **kw, **extra)[:, IDS.shape[1]:]
            from_embeds = model.generate(inputs_embeds=embeds, **kw, **extra)
            assert from_embeds.tolist() == from_ids.tolist(), extra


@pytest.mark.parametrize("version", VERSIONS)
def test_generate_continues_from_inputs_embeds_and_a_cache(version):
    """3 tokens, then the embeddings of everything so far with the returned cache and 1 more token,
    equal 4 tokens at once (the pattern of transformers' test_generate_continue_from_inputs_embeds)."""
    model = small_model(version)
    emb = model.get_input_embeddings()
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(inputs_embeds=emb(IDS), max_new_tokens=4, **kw).sequences
        first = model.generate(inputs_embeds=emb(IDS), max_new_tokens=3, **kw)
        more = torch.cat([emb(IDS), emb(first.sequences)], dim=1)
        rest = model.generate(inputs_embeds=more, past_key_values=first.past_key_values, max_new_tokens=1, **kw)
    assert torch.cat([first.sequences, rest.sequences], dim=1).tolist() == whole.tolist()


@pytest.mark.parametrize("version", VERSIONS)
def test_cache_is_indexed_by_layer_like_transformers_caches(version):
    """A returned cache reads as transformers' generation tests read one (test_generate_continue_from_past_key_values,
    test_generate_continue_from_inputs_embeds): len(cache) layers, cache[layer] a tuple of that layer's state tensors,
    iteration over the layers. The state after 3 + 1 tokens equals the state after 4 at once."""
    model = small_model(version)
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None, return_dict_in_generate=True)
    with torch.no_grad():
        whole = model.generate(IDS, max_new_tokens=4, **kw).past_key_values
        first = model.generate(IDS, max_new_tokens=3, **kw)
        rest = model.generate(first.sequences, past_key_values=first.past_key_values, max_new_tokens=1, **kw)
    cont = rest.past_key_values
    per_layer = 5 if version == "4" else 3  # token shifts and the WKV state (v4: its aa, bb, pp)
    assert len(whole) == len(cont) == 2 and len(list(whole)) == 2
    for layer in range(2):
        assert len(whole[layer]) == len(cont[layer]) == per_layer
        for a, b in zip(whole[layer], cont[layer]):
            assert a.shape[0] == IDS.shape[0]
            torch.testing.assert_close(a, b)
    with pytest.raises(IndexError):
        whole[2]


# --------------------------------------------------------------- 2, 3: hidden states, kwargs, config
@pytest.mark.parametrize("version", VERSIONS)
def test_generate_returns_hidden_states(version):
    model = small_model(version)
    with torch.no_grad():
        out = model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None,
                             output_hidden_states=True, return_dict_in_generate=True)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    for step, states in enumerate(out.hidden_states):
        assert len(states) == 3  # the embedding, after each of the 2 blocks (final norm applied to the last)
        assert all(h.shape == (2, 7 if step == 0 else 1, 32) for h in states)


def test_prepare_inputs_passes_on_what_it_does_not_name():
    model = small_model("7")
    inputs = model.prepare_inputs_for_generation(IDS, output_hidden_states=True, output_attentions=False, my_flag=3)
    assert inputs["output_hidden_states"] is True and inputs["my_flag"] == 3 and inputs["output_attentions"] is False


@pytest.mark.parametrize("version", VERSIONS)
def test_config_output_hidden_states_and_their_gradients(version):
    """config.output_hidden_states=True is honoured (the forward argument is None), and the hidden
    states are part of the graph: retain_grad gives them a gradient."""
    model = small_model(version, output_hidden_states=True).train()
    out = model(IDS)
    assert out.hidden_states is not None and len(out.hidden_states) == 3
    first, last = out.hidden_states[0], out.hidden_states[-1]
    first.retain_grad()
    last.retain_grad()
    out.logits.sum().backward()
    assert first.grad is not None and last.grad is not None and first.grad.abs().sum() > 0
    assert model(IDS, output_hidden_states=False).hidden_states is None


# -------------------------------------------------------------------------------- 4: tied embeddings
@pytest.mark.parametrize("version", VERSIONS)
def test_tie_word_embeddings(version, tmp_path):
    model = small_model(version, tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.emb.weight
    with torch.no_grad():
        model.model.emb.weight[7].add_(1.0)  # one matrix: the head sees it
        logits = model(IDS).logits
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.lm_head.weight is back.model.emb.weight
    with torch.no_grad():
        torch.testing.assert_close(back(IDS).logits, logits)
    untied = small_model(version)
    assert untied.lm_head.weight is not untied.model.emb.weight


# ------------------------------------------------------------------------------------------- 5: loss
def test_shift_labels_give_the_same_loss_as_labels():
    model = small_model("6")
    labels = IDS.clone()
    labels[0, :3] = -100
    shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=-100)
    with torch.no_grad():
        a = model(IDS, labels=labels).loss
        b = model(IDS, shift_labels=shifted).loss
        # num_items_in_batch: the sum over the batch's targets divided by that count
        c = model(IDS, labels=labels, num_items_in_batch=torch.tensor(40)).loss
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(c, a * int((shifted != -100).sum()) / 40)


def test_trainer_gradient_accumulation_equals_the_whole_batch(tmp_path):
    """transformers' Trainer, batch 1 x gradient accumulation 4, makes the update of batch 4 x 1: the rows
    have different numbers of targets, so this needs the loss normalised by all of the batch's targets
    (`num_items_in_batch`), which Trainer leaves to a model whose forward takes **kwargs."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(4):
        ids = torch.randint(1, 99, (12,), generator=g)
        labels = ids.clone()
        labels[: 1 + 3 * i] = -100  # 11, 8, 5, 2 targets
        rows.append({"input_ids": ids, "labels": labels})

    class Grads(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            self.grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    def gradients(batch, accumulate):
        args = TrainingArguments(
            output_dir=str(tmp_path / f"b{batch}"), per_device_train_batch_size=batch, gradient_accumulation_steps=accumulate,
            max_steps=1, learning_rate=0.0, optim="sgd", max_grad_norm=0.0, report_to=[], save_strategy="no",
            logging_strategy="no", use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True,
        )
        seen = Grads()
        Trainer(model=small_model("7", seed=1), args=args, train_dataset=rows, callbacks=[seen]).train()
        return seen.grads

    whole, accumulated = gradients(4, 1), gradients(1, 4)
    assert whole.keys() == accumulated.keys()
    for name, grad in whole.items():
        torch.testing.assert_close(accumulated[name], grad, rtol=1e-4, atol=1e-8, msg=name)


# ------------------------------------------------------------------------------------------ 6: dtypes
FP32_KEPT = ("time_decay", "time_first", "time_faaaa", "ln_x")


def _dtypes(model):
    kept = {n: p.dtype for n, p in model.named_parameters() if any(part in FP32_KEPT for part in n.split("."))}
    rest = {n: p.dtype for n, p in model.named_parameters() if n not in kept}
    return kept, rest


@pytest.mark.parametrize("version", ["4", "5.2", "6"])
def test_fp32_kept_parameters_whatever_the_way_the_model_is_made(version, tmp_path):
    model = small_model(version)
    model.save_pretrained(tmp_path)
    made = {
        "from_config": AutoModelForCausalLM.from_config(small_config(version), dtype=torch.bfloat16),
        "from_pretrained": AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16),
    }
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        made["constructor"] = FAMILIES[int(version[0])][2](small_config(version))
    finally:
        torch.set_default_dtype(default)
    for how, m in made.items():
        kept, rest = _dtypes(m)
        assert kept and set(kept.values()) == {torch.float32}, (how, kept)
        # everything else in the model's dtype, v6's decay LoRA (time_decay_w1/w2) included, as in the reference
        assert set(rest.values()) == {torch.bfloat16}, (how, {n: d for n, d in rest.items() if d != torch.bfloat16})
        with torch.no_grad():
            assert torch.isfinite(m(IDS).logits).all()


# --------------------------------------------------------------------------- 7: GenerationMixin base
@pytest.mark.parametrize("family", [4, 5, 6, 7])
def test_generation_mixin_is_a_direct_base(family):
    assert GenerationMixin in FAMILIES[family][2].__bases__


# ------------------------------------------------------------------------------ 8: RWKV-7 layer 0
def test_rwkv7_layer0_value_residual_is_saved_but_not_trained():
    """Layer 0 makes v_first and never uses its v0/v1/v2: they are saved (checkpoints carry them, export
    writes them) but are no parameters, so every parameter gets a gradient (DDP needs no
    find_unused_parameters=True)."""
    model = small_model("7").train()
    names = {n for n, _ in model.named_parameters()}
    saved = set(model.state_dict())
    for t in ("v0", "v1", "v2"):
        assert f"model.blocks.0.att.{t}" not in names and f"model.blocks.0.att.{t}" in saved
        assert f"model.blocks.1.att.{t}" in names
    model(IDS, labels=IDS).loss.backward()
    assert [n for n, p in model.named_parameters() if p.grad is None] == []


# ----------------------------------------------------------------------------- wkv_mode="recurrent"
@pytest.mark.parametrize("where", ["argument", "config"])
def test_recurrent_mode_is_honoured_on_every_step(where, monkeypatch):
    """wkv_mode="recurrent" (forward argument or config) is honoured on the prompt and on every decode
    step (which "auto" gives the chunked form, and on CUDA fla's kernels, in a captured graph too)."""
    from rwkv_hf.modeling import modeling_rwkv7

    model = small_model("7", **({"wkv_mode": "recurrent"} if where == "config" else {}))
    kw = {"wkv_mode": "recurrent"} if where == "argument" else {}
    for form in ("chunk", "fla"):
        monkeypatch.setitem(modeling_rwkv7.WKV_FORMS, form, lambda *a, _f=form: pytest.fail(f"the {_f} form ran"))
    calls = []
    real = modeling_rwkv7.WKV_FORMS["recurrent"]
    monkeypatch.setitem(modeling_rwkv7.WKV_FORMS, "recurrent", lambda *a, **k: calls.append(a[0].shape[1]) or real(*a, **k))
    with torch.no_grad():
        model.generate(IDS, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=None, **kw)
    assert calls == [7, 7, 1, 1, 1, 1]  # 2 layers: the prompt, then 2 one-token steps


# ------------------------------------------------------------------------------------ rwkv-hf demo
def test_demo_report_says_skipped_not_passed():
    from rwkv_hf.demo import DemoReport, format_report

    report = DemoReport(checkpoint="x.pth", synthetic=True, batch_equals_single=True, remote_equals_installed=None,
                        reference_note="the reference package `rwkv` is not installed")
    text = format_report(report)
    assert "ALL CHECKS PASSED" not in text and "2 skipped (trust_remote_code, reference)" in text
    report.remote_equals_installed, report.reference_rel_diff = True, 1e-6
    assert "ALL CHECKS PASSED" in format_report(report)
