import importlib.resources
import json
import os

import pytest


@pytest.fixture(scope="session")
def reference():
    """BlinkDL's reference tokenizer (rwkv.rwkv_tokenizer.TRIE_TOKENIZER); built once, it takes seconds."""
    rwkv = pytest.importorskip("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="session")
def lambada_texts():
    data = importlib.resources.files("rwkv_hf.evaluation").joinpath("lambada_test.jsonl").read_text("utf-8")
    return [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
