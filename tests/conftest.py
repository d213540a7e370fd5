import importlib
import importlib.resources
import json
import os

import pytest


def require_judge(module: str):
    """Import an outside judge of these tests (a package of the `test` extra). Missing, the test
    FAILS: a CI without its judges must not go green by skipping them."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        pytest.fail(f"{module!r}, a judge of this test (pip install -e '.[test]'), cannot be imported: {e}", pytrace=False)


@pytest.fixture(scope="session")
def reference_package():
    """BlinkDL's `rwkv` package must be installed (the tests run it in a subprocess)."""
    from rwkv_hf.testing import reference_available

    if not reference_available():
        pytest.fail("the reference package `rwkv` (rwkv==0.8.32, in the `test` extra) is not installed", pytrace=False)


@pytest.fixture(scope="session")
def reference():
    """BlinkDL's reference tokenizer (rwkv.rwkv_tokenizer.TRIE_TOKENIZER); built once, it takes seconds."""
    rwkv = require_judge("rwkv")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    return TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))


@pytest.fixture(scope="session")
def lambada_texts():
    data = importlib.resources.files("rwkv_hf.evaluation").joinpath("lambada_test.jsonl").read_text("utf-8")
    return [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
