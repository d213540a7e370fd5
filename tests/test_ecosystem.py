"""What a Hugging Face / RWKV user's usual tools get from a converted folder: padding for a batch,
generation lengths as lm-eval asks for them, the World chat format and where a chat turn stops, PEFT."""

import json
import re

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import rwkv_hf  # noqa: F401  (registers the Auto classes)
from rwkv_hf.convert import convert_checkpoint
from rwkv_hf.convert.blinkdl import config_from_state_dict, to_hf_key
from rwkv_hf.modeling import FAMILIES
from rwkv_hf.testing import make_state_dict, run_without_rwkv_hf
from rwkv_hf.tokenization import RwkvWorldTokenizer, RwkvWorldTokenizerFast, write_tokenizer_folder

SIZES = dict(n_layer=2, n_embd=64, head_size=32)


def quiet(*_):
    pass


@pytest.fixture(scope="module")
def v7_sd():
    return make_state_dict("7", seed=5, **SIZES)


@pytest.fixture(scope="module")
def folder(v7_sd, tmp_path_factory):
    root = tmp_path_factory.mktemp("eco")
    torch.save(v7_sd, root / "v7.pth")
    convert_checkpoint(root / "v7.pth", root / "hf", log=quiet)
    return root / "hf"


@pytest.fixture(scope="module")
def loaded(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(folder), AutoModelForCausalLM.from_pretrained(folder).eval()


def new_tokens(out, prompt_len, eos=(0, 261)):
    """The generated ids of each row, up to and including its first eos (the rest is padding)."""
    rows = []
    for row in out[:, prompt_len:].tolist():
        ends = [i for i, t in enumerate(row) if t in eos]
        rows.append(row[: ends[0] + 1] if ends else row)
    return rows


_TOKENIZERS = {}  # one slow and one fast tokenizer for the module (each takes seconds to build)


def _tokenizer(cls):
    if cls not in _TOKENIZERS:
        _TOKENIZERS[cls] = cls()
    return _TOKENIZERS[cls]


# ------------------------------------------------------------------------------------------ padding
def test_tokenizers_pad_left_by_default(tmp_path, loaded):
    write_tokenizer_folder(tmp_path / "tok")
    assert json.loads((tmp_path / "tok" / "tokenizer_config.json").read_text())["padding_side"] == "left"
    for tok in (_tokenizer(RwkvWorldTokenizer), _tokenizer(RwkvWorldTokenizerFast), loaded[0]):
        assert tok.padding_side == "left"
        ids = tok(["a b c d", "x"], padding=True)["input_ids"]
        assert ids[1][0] == 0 and ids[1][-1] != 0, type(tok).__name__
        tok.save_pretrained(tmp_path / "saved")
        assert json.loads((tmp_path / "saved" / "tokenizer_config.json").read_text())["padding_side"] == "left"


def test_padded_batch_continues_each_row_as_alone(loaded):
    """The README's batch example: the short row's greedy continuation is the one it gets alone."""
    tok, model = loaded
    texts = ["Hello", "The capital of France is"]
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=8, do_sample=False)
        rows = new_tokens(out, batch["input_ids"].shape[1])
        for text, row in zip(texts, rows):
            alone = tok(text, return_tensors="pt")
            assert new_tokens(model.generate(**alone, max_new_tokens=8, do_sample=False), alone["input_ids"].shape[1])[0] == row


# ------------------------------------------------------------------------------- generation config
def test_generation_config_leaves_the_length_to_the_caller(folder, loaded):
    """lm-eval's generate_until asks for `max_length` = prompt + max_gen_toks; it must get that many."""
    gen = json.loads((folder / "generation_config.json").read_text())
    assert "max_new_tokens" not in gen and "max_length" not in gen
    assert gen["eos_token_id"] == [0, 261] and gen["pad_token_id"] == 0
    tok, model = loaded
    assert tok.decode([261]) == "\n\n"
    ids = tok(["Question: what is 2 + 3?\nAnswer:"], return_tensors="pt")["input_ids"]
    with torch.no_grad():  # as lm-eval calls it: max_length, no max_new_tokens, its own stopping criteria
        out = model.generate(input_ids=ids, max_length=ids.shape[1] + 12, do_sample=False, pad_token_id=0, eos_token_id=0)
    assert out.shape[1] == ids.shape[1] + 12


def test_lm_eval_generate_until_gets_max_gen_toks(folder, loaded):
    """lm-eval's own HFLM, generate_until with 12 tokens and a stop string that never comes: 12 tokens."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    prompt = "Question: what is 2 + 3?\nAnswer:"
    lm = HFLM(pretrained=str(folder), batch_size=1, device="cpu", dtype="float32")
    request = Instance("generate_until", {}, (prompt, {"until": ["@@@"], "max_gen_toks": 12, "do_sample": False}), 0)
    (text,) = lm.generate_until([request], disable_tqdm=True)
    tok, model = loaded
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        twelve = model.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=0)[0, ids.shape[1] :]
    assert len(twelve) == 12 and text == tok.decode(twelve, skip_special_tokens=True)


# ------------------------------------------------------------------------------------- chat format
ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant", "tool": "Observation"}


def world_chat_reference(messages, add_generation_prompt=True):
    """The World chat prompt, derived from the tools that write it (not from our template):

    - BlinkDL's ChatRWKV, API_DEMO_WORLD.py: a message is ``re.sub(r"\\n{2,}", "\\n", text).strip()``
      (with "\\r\\n" as "\\n"); turns are "User: ..." / "Assistant: ..." joined by "\\n\\n"; the prompt
      ends with "Assistant:" and no space ("dont add space after this final ':'").
    - ChatRWKV v2/chat.py: each user message is stripped; a reply ends at the first "\\n\\n".
    - llama.cpp src/llama-chat.cpp, LLM_CHAT_TEMPLATE_RWKV_WORLD: "System: ", "User: ", "Assistant: "
      + trim(content) + "\\n\\n", then "Assistant:"; it drops other roles.
    - RWKV-Runner backend-python/routes/completion.py (chat_template, v5+): "System: " for system
      messages, tool results as their own turn (it names the role "Obersavtion", sic; we spell it
      "Observation"), assistant messages without content skipped.
    A list of parts is its text parts in order (OpenAI's content format).
    """
    out = []
    for m in messages:
        content = m.get("content")
        if content is None:
            continue
        if not isinstance(content, str):
            content = "".join(p if isinstance(p, str) else p["text"] for p in content)
        content = re.sub(r"\n{2,}", "\n", content.replace("\r\n", "\n")).strip()
        out.append(f"{ROLE_NAMES[m['role']]}: {content}\n\n")
    return "".join(out) + ("Assistant:" if add_generation_prompt else "")


CHATS = [
    [{"role": "user", "content": "Tell me about RWKV."}],
    [
        {"role": "system", "content": "  You are brief.\n\n"},
        {"role": "user", "content": "Line one\n\n\nline two\r\n\r\nline three  "},
        {"role": "assistant", "content": " A reply as the model wrote it.\n\n"},  # re-fed: no double space
        {"role": "user", "content": "\n\nAnd    now?\n"},
    ],
    [
        {"role": "user", "content": [{"type": "text", "text": "What is "}, {"type": "text", "text": "2 + 2?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": "{}"}}]},
        {"role": "tool", "content": "4\n\n"},
        {"role": "assistant", "content": [{"type": "text", "text": "It is 4."}]},
        {"role": "user", "content": "Code:\n\n    def f():\n\n        return 1\n"},
    ],
]


@pytest.mark.parametrize("cls", [RwkvWorldTokenizer, RwkvWorldTokenizerFast])
@pytest.mark.parametrize("chat", CHATS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_the_world_format(cls, chat, add_generation_prompt):
    tok = _tokenizer(cls)
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == world_chat_reference(chat, add_generation_prompt)
    assert "\n\n\n" not in text and "  " not in text.replace("    ", "")


_TEXT = st.lists(st.sampled_from(["\n", "\r\n", "\r", " ", "\t", "a", "b", "中", "\u3000", "User:"]), max_size=12).map("".join)
_MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(sorted(ROLE_NAMES)), "content": _TEXT | st.lists(_TEXT, max_size=3)})


@settings(max_examples=150, deadline=None)
@given(chat=st.lists(_MESSAGE, min_size=1, max_size=4), add_generation_prompt=st.booleans())
def test_chat_template_matches_the_world_format_for_any_text(chat, add_generation_prompt):
    tok = _tokenizer(RwkvWorldTokenizer)
    text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert text == world_chat_reference(chat, add_generation_prompt)


def test_chat_template_continues_a_prefilled_reply():
    tok = _tokenizer(RwkvWorldTokenizer)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": " The answer is "}]
    assert tok.apply_chat_template(chat, tokenize=False, continue_final_message=True) == "User: Hi\n\nAssistant: The answer is"


def test_chat_template_rejects_what_it_cannot_write():
    from jinja2 import TemplateError

    tok = _tokenizer(RwkvWorldTokenizer)
    with pytest.raises(TemplateError, match="unknown role"):
        tok.apply_chat_template([{"role": "narrator", "content": "x"}], tokenize=False)
    with pytest.raises(TemplateError, match="text only"):
        tok.apply_chat_template([{"role": "user", "content": [{"type": "image", "url": "x.png"}]}], tokenize=False)


# ------------------------------------------------------------------------- a chat turn's end
@pytest.fixture(scope="module")
def turn_end_folder(v7_sd, tmp_path_factory):
    """A v7 folder whose greedy chat reply writes "\\n\\n" (token 261) as its third token: the head's row
    261 is made that of the token greedy decoding picks there (a tie, which argmax breaks to the lower id)."""
    spec, cfg = config_from_state_dict(v7_sd)
    model = FAMILIES[spec.family][2](cfg).eval()
    model.load_state_dict({to_hf_key(k): v for k, v in v7_sd.items()})
    tok = _tokenizer(RwkvWorldTokenizerFast)
    ids = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        greedy = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0, eos_token_id=0)[0, ids.shape[1] :]
    third = int(greedy[2])
    assert third > 261 and 261 not in greedy[:2].tolist()
    sd = dict(v7_sd)
    sd["head.weight"] = sd["head.weight"].clone()
    sd["head.weight"][261] = sd["head.weight"][third]
    root = tmp_path_factory.mktemp("turn")
    torch.save(sd, root / "v7.pth")
    convert_checkpoint(root / "v7.pth", root / "hf", log=quiet)
    return root / "hf"


def test_pipeline_chat_stops_where_the_cli_chat_stops(turn_end_folder):
    """The CLI stops a reply at "\\n\\n" (ChatRWKV's rule); generation_config's eos 261 makes generate() and
    the pipeline stop there (llama.cpp's convert_hf_to_gguf.py makes 261 RWKV World's end-of-turn token)."""
    from transformers import pipeline

    from rwkv_hf.generation_cli import ChatSession, load_model

    tok, model = load_model(str(turn_end_folder), "cpu")
    cli_reply = ChatSession(model, tok, temperature=0, max_new_tokens=32).say(CHATS[0][0]["content"])
    chat = pipeline("text-generation", model=str(turn_end_folder))
    out = chat(CHATS[0], max_new_tokens=32, do_sample=False)[0]["generated_text"]
    reply = out[-1]["content"]
    assert out[-1]["role"] == "assistant" and reply.endswith("\n\n") and reply.count("\n\n") == 1
    assert reply.strip() == cli_reply
    # generate() on the templated prompt stops there too, and the caller can go on past it
    inputs = tok.apply_chat_template(CHATS[0], add_generation_prompt=True, return_dict=True, return_tensors="pt")
    n = inputs["input_ids"].shape[1]
    with torch.no_grad():
        stopped = model.generate(**inputs, max_new_tokens=32, do_sample=False)
        past = model.generate(**inputs, max_new_tokens=32, do_sample=False, eos_token_id=0)
    assert stopped.shape[1] == n + 3 and int(stopped[0, -1]) == 261
    assert past.shape[1] > n + 3 and past[0, : n + 3].tolist() == stopped[0].tolist()


# ----------------------------------------------------------------------------------------------- PEFT
@pytest.mark.parametrize("version", ["4", "5.2", "6", "7"])
def test_peft_lora_without_target_modules(version):
    from peft import LoraConfig, get_peft_model

    sd = make_state_dict(version, n_layer=1, n_embd=64, head_size=32, seed=9)
    spec, cfg = config_from_state_dict(sd)
    model = FAMILIES[spec.family][2](cfg)
    model.load_state_dict({to_hf_key(k): v for k, v in sd.items()})
    lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if ".lora_A." in n}
    expected = {"receptance", "key", "value", "output"} | ({"gate"} if spec.family in (5, 6) else set())
    assert adapted == expected
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():  # LoRA's B starts at zero: the adapted model computes what the model did
        adapted_logits = lora(input_ids=ids).logits
        with lora.disable_adapter():
            torch.testing.assert_close(adapted_logits, lora(input_ids=ids).logits)


def test_peft_table_gets_our_entries_when_peft_came_first():
    """`register_lora_targets` with PEFT imported already (the other order is the subprocess test below)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as table

    from rwkv_hf.modeling.rwkv_peft import LORA_TARGET_MODULES, register_lora_targets

    saved = {k: table.pop(k) for k in LORA_TARGET_MODULES}
    try:
        register_lora_targets()
        assert {k: tuple(table[k]) for k in LORA_TARGET_MODULES} == LORA_TARGET_MODULES
    finally:
        table.update(saved)


_PEFT_WITHOUT_RWKV_HF = r"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
assert "peft" not in sys.modules
from peft import LoraConfig, get_peft_model  # imported after the folder's code: its import hook adds the entries
lora = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))
names = sorted({n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in lora.named_parameters() if ".lora_A." in n})
print(",".join(names))
"""


def test_peft_defaults_reach_a_folder_loaded_without_rwkv_hf(folder):
    proc = run_without_rwkv_hf(_PEFT_WITHOUT_RWKV_HF, [folder])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "key,output,receptance,value"
