"""transformers' own common model tests (`ModelTesterMixin`, and `GenerationTesterMixin` where its source
is at hand: see `transformers_suite`) on a small model of every RWKV version, wired the way transformers
wires its RWKV-4 and Mamba models. The test code is transformers', fetched at the installed version when
these tests run; only the wiring and the skips are ours. Each skip says why it cannot apply to an
attention-free recurrent model.
"""

from __future__ import annotations

import os
import unittest
import unittest.mock

import pytest
import torch

import rwkv_hf  # noqa: F401  (registers the Auto classes)
from rwkv_hf.modeling import FAMILIES
from transformers.models.auto import modeling_auto

import transformers_suite

common = transformers_suite.load()  # an error here (no sources) fails the collection: never a skip
ModelTesterMixin = common.ModelTesterMixin
GenerationTesterMixin = common.GenerationTesterMixin
ids_tensor = common.ids_tensor


class RwkvWorldModelTester:
    """A small model: vocab 99, width 32 (4 heads of 8), 2 layers, batch 3 x 7 tokens."""

    def __init__(self, parent, version: str, batch_size=3, seq_length=7, vocab_size=99, hidden_size=32,
                 num_hidden_layers=2, intermediate_size=64, head_size=8):
        self.parent = parent
        self.version = version
        self.batch_size = batch_size
        self.seq_length = seq_length
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.head_size = head_size
        self.num_attention_heads = hidden_size // head_size
        self.is_training = True
        self.use_labels = True

    def get_config(self):
        family = int(self.version[0])
        extra = {}
        if family == 5:
            extra["rwkv_version"] = self.version
        elif family == 6:
            extra.update(mix_lora=8, decay_lora=8)
        elif family == 7:
            extra.update(decay_lora=8, a_lora=8, v_lora=8, gate_lora=8)
        return FAMILIES[family][0](
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_hidden_layers,
            intermediate_size=self.intermediate_size,
            head_size=self.head_size,
            pad_token_id=0,
            bos_token_id=0,
            eos_token_id=0,
            **extra,
        )

    def prepare_config_and_inputs_for_common(self):
        input_ids = ids_tensor([self.batch_size, self.seq_length], self.vocab_size)
        attention_mask = torch.ones_like(input_ids)
        return self.get_config(), {"input_ids": input_ids, "attention_mask": attention_mask}


class _RwkvCommonTests(ModelTesterMixin, GenerationTesterMixin):
    version: str = None
    has_attentions = False
    # the only switches off (4.57's tests of attention heads; transformers 5 has none):
    test_pruning = False  # no attention heads to prune
    test_head_masking = False  # no attention heads to mask
    is_encoder_decoder = False

    def setUp(self):
        self.model_tester = RwkvWorldModelTester(self, self.version)

    if hasattr(GenerationTesterMixin, "test_past_key_values_format"):

        @unittest.skip(reason="a recurrent state has no keys and values per token ([batch, heads, seq_len, head_dim], "
                              "growing with the sequence): it is a fixed size per layer (test_conformance.py checks "
                              "its per-layer reading, test_cache_is_indexed_by_layer_like_transformers_caches)")
        def test_past_key_values_format(self):
            pass

    if hasattr(GenerationTesterMixin, "test_left_padding_compatibility"):

        def test_left_padding_compatibility(self, *args, **kwargs):
            # transformers' test skips every model without attentions ("doesn't support padding"); an RWKV model
            # honours attention_mask (masked positions change nothing), so the test runs here as written
            self.has_attentions = True  # read only by that skip; the instance attribute goes away after it
            try:
                super().test_left_padding_compatibility(*args, **kwargs)
            finally:
                del self.has_attentions

    @classmethod
    def setUpClass(cls):
        # transformers' tests know a model's task by the class names of the auto mappings it was added
        # to in transformers' own source; a model registered from outside is not in them, so it is
        # put there (by its model_type) while these tests run, as an in-tree model would be
        config_cls, model_cls, lm_cls = FAMILIES[int(cls.version[0])]
        cls._patches = [
            unittest.mock.patch.dict(modeling_auto.MODEL_MAPPING_NAMES, {config_cls.model_type: model_cls.__name__}),
            unittest.mock.patch.dict(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, {config_cls.model_type: lm_cls.__name__}),
        ]
        for p in cls._patches:
            p.start()

    @classmethod
    def tearDownClass(cls):
        for p in cls._patches:
            p.stop()


for _version in ("4", "5.0", "5.2", "6", "7"):
    _name = "TestRwkv{}Common".format(_version.replace(".", ""))
    _classes = {"version": _version, "all_model_classes": FAMILIES[int(_version[0])][1:]}
    globals()[_name] = type(_name, (_RwkvCommonTests, unittest.TestCase), _classes)
del _name, _version, _classes


@pytest.mark.skipif(transformers_suite.GENERATION_TESTS_SHIPPED, reason="GenerationTesterMixin ran above")
def test_generation_tester_mixin_needs_a_checkout():
    given = os.environ.get("RWKV_HF_TRANSFORMERS_TESTS")
    where = f"RWKV_HF_TRANSFORMERS_TESTS={given}" if given else "transformers' PyPI sdist"
    pytest.skip(f"{where} has no generation/test_utils.py: GenerationTesterMixin did not run (set "
                "RWKV_HF_TRANSFORMERS_TESTS to the tests/ folder of a transformers checkout at the installed version "
                "to run it); test_conformance.py checks generation's points of issue 11")
