"""The RWKV World tokenizer backed by ``tokenizers`` (fast).

``tokenizer.json`` is built from the vocab file by ``tokenizer_json_rwkv_world.build_tokenizer_json``
(see that file for why the pipeline reproduces the reference's greedy longest byte match exactly).
This file is copied into model folders as remote code: it imports only its siblings, the standard
library, tokenizers and transformers.
"""

import os
import re

from tokenizers import Tokenizer, processors
from transformers import PreTrainedTokenizerFast

from .tokenization_rwkv_world import (
    EOS_TOKEN,
    FIRST_UNUSED_ID,
    VOCAB_SIZE,
    RwkvWorldTokenizer,
    _check_id,
    _SURROGATE,
    CHAT_TEMPLATE,
    default_vocab_file,
    slim_saved_config,
    load_vocab,
    token_display,
    unused_token,
)
from .tokenizer_json_rwkv_world import build_tokenizer_json

TOKENIZER_FILE = "tokenizer.json"


def build_backend(vocab_file=None) -> Tokenizer:
    """The ``tokenizers.Tokenizer`` for a vocab file (default: the shipped one)."""
    return Tokenizer.from_str(tokenizer_json_text(vocab_file))


def tokenizer_json_text(vocab_file=None) -> str:
    id_to_bytes = load_vocab(vocab_file or default_vocab_file())
    names = [token_display(t) if t is not None else unused_token(i) for i, t in enumerate(id_to_bytes)]
    names[0] = EOS_TOKEN
    return build_tokenizer_json(names, id_to_bytes)


_BYTE_NAME = re.compile(r"^(?:<0x[0-9A-F]{2}>)+$")


def _table_from_vocab(vocab):
    """id -> bytes (None for id 0 and the unused ids) from the display names of the backend vocab."""
    table = [None] * VOCAB_SIZE
    for name, index in vocab.items():
        if index == 0 or index >= FIRST_UNUSED_ID:
            continue
        if _BYTE_NAME.match(name):
            table[index] = bytes(int(name[i + 3 : i + 5], 16) for i in range(0, len(name), 6))
        else:
            table[index] = name.encode("utf-8")
    return table


def _check_text(text):
    if isinstance(text, str):
        texts = (text,)
    elif isinstance(text, (list, tuple)):
        texts = [t for t in text if isinstance(t, str)]
        for t in text:
            if isinstance(t, (list, tuple)):
                texts.extend(x for x in t if isinstance(x, str))
    else:
        return
    for t in texts:
        m = _SURROGATE.search(t)
        if m:
            raise ValueError(
                f"text contains a lone surrogate U+{ord(m.group()):04X} at index {m.start()}; "
                "it cannot be encoded as UTF-8"
            )


class RwkvWorldTokenizerFast(PreTrainedTokenizerFast):
    """Fast RWKV World tokenizer; gives exactly the reference's ids for every string."""

    vocab_files_names = {"vocab_file": "rwkv_vocab_v20230424.txt", "tokenizer_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]
    slow_tokenizer_class = RwkvWorldTokenizer

    def __init__(
        self,
        vocab_file=None,
        tokenizer_file=None,
        eos_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        bos_token=EOS_TOKEN,
        unk_token=None,
        add_bos_token=False,
        clean_up_tokenization_spaces=False,
        split_special_tokens=True,
        **kwargs,
    ):
        kwargs.setdefault("chat_template", CHAT_TEMPLATE)
        if vocab_file is None:
            vocab_file = default_vocab_file()
        for key in ("vocab", "merges", "normalizer", "pre_tokenizer", "decoder", "post_processor"):
            kwargs.pop(key, None)
        if kwargs.get("tokenizer_object") is None and not (tokenizer_file and os.path.isfile(tokenizer_file)):
            kwargs["tokenizer_object"] = build_backend(vocab_file)
            tokenizer_file = None
        # The text tokens are added tokens of tokenizer.json already; listing 65k of them again in
        # kwargs only costs time (transformers deep-copies its init kwargs).
        decoder = kwargs.get("added_tokens_decoder")
        if isinstance(decoder, dict):
            kwargs["added_tokens_decoder"] = {
                k: v for k, v in decoder.items() if getattr(v, "special", False) and str(v) != EOS_TOKEN
            }
        object.__setattr__(self, "_rwkv_add_bos", bool(add_bos_token))
        super().__init__(
            vocab_file=vocab_file,
            tokenizer_file=tokenizer_file,
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token=bos_token,
            unk_token=unk_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            split_special_tokens=split_special_tokens,
            **kwargs,
        )
        self.vocab_file = vocab_file
        self._id_to_bytes = _table_from_vocab(self._tokenizer.get_vocab(with_added_tokens=False))
        self._tokenizer.encode_special_tokens = self.split_special_tokens
        object.__setattr__(self, "_rwkv_add_bos", bool(add_bos_token))
        self._set_post_processor()
        self.init_kwargs["add_bos_token"] = self._rwkv_add_bos

    # transformers 5 rebuilds custom-__init__ tokenizers from vocab pieces unless told otherwise.
    @classmethod
    def convert_to_native_format(cls, trust_remote_code=False, **kwargs):
        return kwargs

    def _set_post_processor(self):
        if self.add_bos_token:
            self._tokenizer.post_processor = processors.TemplateProcessing(
                single=f"{EOS_TOKEN}:0 $A:0",
                pair=f"{EOS_TOKEN}:0 $A:0 {EOS_TOKEN}:1 $B:1",
                special_tokens=[(EOS_TOKEN, 0)],
            )
        else:
            self._tokenizer.post_processor = None

    @property
    def add_bos_token(self):
        return getattr(self, "_rwkv_add_bos", False)

    @add_bos_token.setter
    def add_bos_token(self, value):
        object.__setattr__(self, "_rwkv_add_bos", bool(value))
        if getattr(self, "_tokenizer", None) is not None:
            self._set_post_processor()

    def _add_tokens(self, new_tokens, special_tokens=False):
        # <|endoftext|> is id 0 of the model vocab already. As an added token the backend would match it
        # in text (even with encode_special_tokens it cuts the greedy match at its edges), while the
        # reference encodes its bytes. So it is never added.
        new_tokens = [t for t in new_tokens if str(t) != EOS_TOKEN]
        if not new_tokens:
            return 0
        return super()._add_tokens(new_tokens, special_tokens=special_tokens)

    def update_post_processor(self):  # transformers 5 hook
        if getattr(self, "_tokenizer", None) is not None:
            self._set_post_processor()

    @property
    def vocab_size(self):
        return VOCAB_SIZE

    def __len__(self):
        return VOCAB_SIZE

    def num_special_tokens_to_add(self, pair=False):
        return (2 if pair else 1) if self.add_bos_token else 0

    # ------------------------------------------------------------------ encoding
    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        _check_text(text)
        _check_text(text_pair)
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):  # transformers 4.x
        _check_text(batch_text_or_text_pairs)
        return super()._batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        _check_text(text)
        return super().tokenize(text, *args, **kwargs)

    # ------------------------------------------------------------------ decoding
    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        # Same bytes as the tokenizer.json decoder, straight from the table (and it checks ids).
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        table = self._id_to_bytes
        parts = []
        for index in token_ids:
            index = _check_id(index)
            token = table[index]
            if token is not None:
                parts.append(token)
            elif index == 0 and not skip_special_tokens:
                parts.append(EOS_TOKEN.encode("ascii"))
        return b"".join(parts).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids, skip_special_tokens=False):
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(_check_id(ids))
        return [
            self._tokenizer.id_to_token(_check_id(i)) for i in ids if not (skip_special_tokens and int(i) == 0)
        ]

    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        slim_saved_config(save_directory, kwargs.get("filename_prefix"))
        return files

    def save_vocabulary(self, save_directory, filename_prefix=None):
        name = (filename_prefix + "-" if filename_prefix else "") + self.vocab_files_names["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(self.vocab_file, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        return (path,)
