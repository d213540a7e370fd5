"""LAMBADA and perplexity against BlinkDL's package, batch-size invariance, lm-eval, the CLI.

Synthetic checkpoints have no predictive power on real text: real LAMBADA targets score a perplexity
of ~1e9-1e11, where two printed decimals would need 1e-13 relative agreement from fp32 arithmetic.
So the side-by-side test scores LAMBADA contexts whose last word the model itself wrote
(`rwkv_hf.testing.model_written_lambada`): perplexities in the tens to hundreds, as for a real model
on real text, where the printed lines are a real test and must be identical.
"""

import json
import math
import re

import pytest

from rwkv_hf.cli import main
from rwkv_hf.convert import convert_checkpoint
from rwkv_hf.evaluation import load_docs, lm_eval_task_yaml, run_lambada, stream_logprob
from rwkv_hf.evaluation.lambada import encode_docs, load_model_and_tokenizer, score_pairs, tokenizer_encode
from rwkv_hf.testing import save_checkpoint, write_model_written_lambada

from conftest import require_judge

VERSIONS = ["4", "5.2", "6", "7"]
needs_reference = pytest.mark.usefixtures("reference_package")  # missing: the tests fail (conftest)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    made = {}

    def get(version):
        if version not in made:
            d = tmp_path_factory.mktemp(f"v{version}")
            ckpt = save_checkpoint(d / "model.pth", version, n_layer=2, n_embd=64, seed=1)
            convert_checkpoint(ckpt, d / "hf")
            made[version] = (ckpt, d / "hf")
        return made[version]

    return get


LINE = re.compile(r"^(hf|reference) (\d+) ppl (\d+\.\d\d|inf) acc (\d+\.\d\d)$")


@needs_reference
@pytest.mark.parametrize("version", VERSIONS)
def test_lambada_matches_reference(models, version, tmp_path):
    ckpt, folder = models(version)
    data = write_model_written_lambada(folder, tmp_path / "docs.jsonl", limit=200, seed=int(float(version) * 10))
    lines = []
    r = run_lambada(folder, data=str(data), reference=ckpt, batch_size=8, print_fn=lines.append, progress=False)
    # a pair of lines per hundred, in the format, identical but for the side's name
    assert len(lines) == 5 and lines[-1].startswith("max |dppl| ")
    parsed = [LINE.match(x).groups() for x in lines[:-1]]
    assert [(p[0], p[1]) for p in parsed] == [("hf", "100"), ("reference", "100"), ("hf", "200"), ("reference", "200")]
    assert parsed[0][1:] == parsed[1][1:] and parsed[2][1:] == parsed[3][1:], lines
    # and the lines test something: a perplexity in a real model's range, some targets right, some wrong
    assert 2 < r["hf"]["ppl"] < 1e4 and 0 < r["hf"]["acc"] < 100, lines
    assert r["max_abs_dacc"] == 0 and r["max_abs_dppl"] < 1e-4 * r["hf"]["ppl"]
    # per document: identical argmax at every target position, log-probs equal to fp32 rounding
    for (lp, ok, am), (rlp, rok, ram) in zip(r["docs"]["hf"], r["docs"]["reference"]):
        assert am == ram and ok == rok
        assert abs(lp - rlp) <= 2e-6 * abs(rlp) + 1e-5


def test_model_written_lambada_is_well_formed(models, tmp_path):
    """The documents keep their contexts; the new last word re-encodes to the tokens that were sampled."""
    _, folder = models("6")
    data = write_model_written_lambada(folder, tmp_path / "docs.jsonl", limit=30, seed=3)
    again = write_model_written_lambada(folder, tmp_path / "again.jsonl", limit=30, seed=3)
    assert data.read_bytes() == again.read_bytes()  # seeded
    originals, written = load_docs(limit=30), load_docs(str(data))
    assert [c for c, _ in written] == [c for c, _ in originals]
    assert sum(t != o for (_, t), (_, o) in zip(written, originals)) > 25
    _, tokenizer = load_model_and_tokenizer(folder)
    enc = tokenizer_encode(tokenizer)
    lengths = [len(enc(t)) for _, t in written]
    assert set(lengths) == {1, 2}


@pytest.mark.parametrize("version", VERSIONS)
def test_batch_sizes_agree(models, version):
    _, folder = models(version)
    model, tokenizer = load_model_and_tokenizer(folder)
    pairs = encode_docs(load_docs(limit=40), tokenizer_encode(tokenizer))
    one = [r for _, r in score_pairs(model, pairs, batch_size=1)]
    eight = [r for _, r in score_pairs(model, pairs, batch_size=8)]
    assert len({len(s) + len(d) for s, d in pairs}) > 10  # real padding happens
    for a, b in zip(one, eight):
        assert a.argmax == b.argmax and a.correct == b.correct
        assert math.isclose(a.logprob, b.logprob, rel_tol=1e-5, abs_tol=1e-4)


def test_lm_eval_matches_our_scorer(models, tmp_path):
    """lm-eval's HFLM on our folder (remote code) gives our acc and perplexity on 50 docs.

    lm-eval encodes context + continuation jointly and calls the continuation whatever follows the
    context's own encoding; we (like BlinkDL) encode them separately. Greedy longest match can merge
    across the boundary, so the two can score different tokens: the test keeps docs where they don't.
    """
    lm_eval = require_judge("lm_eval")
    from lm_eval.tasks import TaskManager

    _, folder = models("7")
    _, tokenizer = load_model_and_tokenizer(folder)
    enc = tokenizer_encode(tokenizer)
    docs = [(c, t) for c, t in load_docs(limit=80) if enc(c + t) == enc(c) + enc(t)][:50]
    assert len(docs) == 50
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": c + t}) + "\n" for c, t in docs), encoding="utf-8")
    (tmp_path / "task.yaml").write_text(lm_eval_task_yaml(str(data)), encoding="utf-8")
    res = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={folder},trust_remote_code=True,add_bos_token=True,dtype=float32",
        tasks=["lambada_rwkv_hf"], task_manager=TaskManager(include_path=str(tmp_path)), batch_size=8, device="cpu",
    )["results"]["lambada_rwkv_hf"]
    ours = run_lambada(folder, data=str(data), batch_size=8, print_fn=lambda s: None, progress=False)
    assert res["acc,none"] == ours["hf"]["acc"] / 100
    assert math.isclose(res["perplexity,none"], ours["hf"]["ppl"], rel_tol=1e-5)


def test_lm_eval_generate_until_left_padding(models):
    """generate_until batches left-padded prompts with a mask: each row must decode as if alone."""
    require_judge("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    _, folder = models("6")
    prompts = ["The cat sat on the", "Once upon a time, in a land far away, there lived a", "Hello", "1, 2, 3,"]
    kw = {"until": ["\n\n"], "max_gen_toks": 6, "do_sample": False}

    def run(bs):
        lm = HFLM(pretrained=str(folder), trust_remote_code=True, batch_size=bs, device="cpu", dtype="float32")
        reqs = [Instance("generate_until", {}, (p, dict(kw)), i) for i, p in enumerate(prompts)]
        return lm.generate_until(reqs, disable_tqdm=True)

    assert run(4) == run(1)


@pytest.mark.parametrize("version", ["5.2", "7"])
def test_ppl_chunked_equals_single_pass(models, version):
    _, folder = models(version)
    model, tokenizer = load_model_and_tokenizer(folder)
    text = " ".join(t for t, _ in load_docs(limit=3))
    tokens = [0] + tokenizer_encode(tokenizer)(text)
    assert len(tokens) > 100
    whole, n = stream_logprob(model, tokens, chunk=len(tokens))
    for chunk in (1, 37):
        part, m = stream_logprob(model, tokens[:80] if chunk == 1 else tokens, chunk=chunk)
        ref = whole if chunk != 1 else stream_logprob(model, tokens[:80], chunk=80)[0]
        assert m == (n if chunk != 1 else 79)
        assert math.isclose(part, ref, rel_tol=1e-5)


@needs_reference
def test_cli_ppl_and_lambada(models, tmp_path, capsys):
    ckpt, folder = models("7")
    text = tmp_path / "t.txt"
    text.write_text(" ".join(t for t, _ in load_docs(limit=2)), encoding="utf-8")
    out = tmp_path / "ppl.json"
    assert main(["ppl", str(folder), str(text), "--chunk", "50", "--reference", str(ckpt), "--json", str(out), "--no-progress"]) == 0
    r = json.loads(out.read_text())
    assert r["tokens"] == r["reference"]["tokens"] > 50
    assert math.isclose(r["hf"]["logprob_sum"], r["reference"]["logprob_sum"], rel_tol=1e-5)

    capsys.readouterr()
    assert main(["lambada", str(folder), "--limit", "3", "--batch-size", "2", "--no-progress"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and LINE.match(lines[0]) and lines[0].startswith("hf 3 ppl ")

    assert main(["lambada", "--print-lm-eval-task"]) == 0
    assert "task: lambada_rwkv_hf" in capsys.readouterr().out
    assert main(["lambada"]) == 2
    assert "MODEL_DIR is required" in capsys.readouterr().err
