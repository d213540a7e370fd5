"""The RWKV World tokenizer backed by ``tokenizers`` (fast).

``tokenizer.json`` is built from the vocab file by ``tokenizer_json_rwkv_world.build_tokenizer_json``
(see that file for why the pipeline reproduces the reference's greedy longest byte match exactly).
This file is copied into model folders as remote code: it imports only its siblings, the standard
library, tokenizers and transformers.
"""

import functools
import os
import re
import threading

from tokenizers import Tokenizer, processors
from transformers import BatchEncoding, PreTrainedTokenizerFast
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

from .tokenization_rwkv_world import (
    _plain_call,
    _LEAN_KEYS,
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


# ------------------------------------------------------------------------------------ lazy encodings
# Without offsets, ``tokenizers`` encodes this vocabulary ~1.5x faster (``encode_batch_fast``: no
# per-token strings, offsets or word indices). So when a call does not ask for offsets, the fast
# tokenizer encodes that way and puts a LazyEncoding in the BatchEncoding for each row. Its ids and
# masks are the fast encoding's; anything else (tokens, offsets, words, char_to_token, ...) first
# encodes the row again with offsets, with the call's truncation, padding and special-token settings,
# and answers from that real ``tokenizers.Encoding`` (checked to carry the same ids and masks).

_EAGER = frozenset({"ids", "type_ids", "attention_mask", "special_tokens_mask", "n_sequences", "sequence_ids"})
_BACKEND_LOCK = threading.Lock()


def _set_backend_state(backend, truncation, padding, encode_special_tokens):
    if truncation is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(**truncation)
    if padding is None:
        backend.no_padding()
    else:
        backend.enable_padding(**padding)
    backend.encode_special_tokens = encode_special_tokens


class _EncodeCall:
    """What one call used: the tokenizer, add_special_tokens, and the backend's settings."""

    __slots__ = ("tokenizer", "add_special_tokens", "truncation", "padding", "encode_special_tokens")

    def __init__(self, tokenizer, add_special_tokens, backend):
        self.tokenizer = tokenizer
        self.add_special_tokens = add_special_tokens
        self.truncation = backend.truncation
        self.padding = backend.padding
        self.encode_special_tokens = backend.encode_special_tokens


class LazyEncoding:
    """A row of a BatchEncoding from the no-offsets path; behaves as its ``tokenizers.Encoding``.

    ``ids``, ``type_ids``, ``attention_mask``, ``special_tokens_mask``, ``sequence_ids`` and
    ``n_sequences`` come from the fast encoding. Any other attribute or method first computes the real
    Encoding (same text, same truncation/padding, with offsets) and is served by it from then on;
    ``resolve()`` returns it. Pickling and copying give the real ``tokenizers.Encoding``.

    It is not an instance of ``tokenizers.Encoding``: code that needs one (``Encoding.merge``, isinstance
    checks) takes ``resolve()``. Resolving sets the backend's truncation/padding for one encode only when
    they differ from the call's (then restores them), like any transformers call on a shared tokenizer.
    """

    __slots__ = ("_fast", "_real", "_call", "_text")

    def __init__(self, fast, call, text):
        self._fast = fast
        self._real = None
        self._call = call
        self._text = text

    def resolve(self):
        """The real ``tokenizers.Encoding`` of this row (computed once)."""
        real = self._real
        if real is not None:
            return real
        fast, call = self._fast, self._call
        want = (call.truncation, call.padding, call.encode_special_tokens)
        backend = call.tokenizer._tokenizer
        with _BACKEND_LOCK:
            saved = (backend.truncation, backend.padding, backend.encode_special_tokens)
            if saved == want:  # the usual case: the tokenizer still has this call's settings
                real = backend.encode_batch([self._text], add_special_tokens=call.add_special_tokens)[0]
            else:  # set them for this one encode (as transformers does for each call), then put back
                try:
                    _set_backend_state(backend, *want)
                    real = backend.encode_batch([self._text], add_special_tokens=call.add_special_tokens)[0]
                finally:
                    _set_backend_state(backend, *saved)
        padding = call.padding
        if padding is not None and len(real) < len(fast):
            # Padded to the longest row of the batch (or a multiple): the row's final length is known.
            real.pad(
                len(fast),
                direction=padding["direction"],
                pad_id=padding["pad_id"],
                pad_type_id=padding["pad_type_id"],
                pad_token=padding["pad_token"],
            )
        for name in ("ids", "attention_mask", "special_tokens_mask", "type_ids"):
            if getattr(real, name) != getattr(fast, name):
                raise RuntimeError(
                    f"the tokenizer now encodes this row differently ({name}) than when the batch was made; "
                    "it was changed in between (added tokens, add_bos_token, ...). Encode again, or pass "
                    "return_offsets_mapping=True to get full encodings at once."
                )
        self._real = real
        self._call = self._text = None
        return real

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        if self._real is None and name in _EAGER:
            return getattr(self._fast, name)
        return getattr(self.resolve(), name)

    def __len__(self):
        return len(self._fast if self._real is None else self._real)

    def __repr__(self):
        if self._real is not None:
            return repr(self._real)
        return f"LazyEncoding(num_tokens={len(self._fast)}, resolved=False)"

    def __reduce_ex__(self, protocol):
        # The real Encoding's own pickle state, rebuilt as a tokenizers.Encoding: no rwkv_hf needed to load.
        real = self.resolve()
        return (type(real), (), real.__getstate__())


# what transformers hands `_encode_plus` / `_batch_encode_plus` that `_encode_fast` knows: the slow
# tokenizer's lean-path arguments, and 5.x's chat-template flag (which sends a call to transformers)
_FAST_PATH_KEYS = _LEAN_KEYS | {"sanitize_control_tokens"}


def _fast_path_texts(text, text_pair, kwargs):
    """The list of texts when a call can take the no-offsets path, else None."""
    if text_pair is not None or not _FAST_PATH_KEYS.issuperset(kwargs):
        return None
    if (
        kwargs.get("is_split_into_words")
        or kwargs.get("return_offsets_mapping")
        or kwargs.get("return_overflowing_tokens")
        or kwargs.get("sanitize_control_tokens")
    ):
        return None
    if isinstance(text, str):
        return [text]
    if isinstance(text, (list, tuple)) and text and all(type(t) is str for t in text):
        return text if isinstance(text, list) else list(text)
    return None


# The methods transformers' `__call__` goes through to `_encode_fast`; a subclass that overrides one of
# them (or `__call__`'s shortcut's target) keeps transformers' `__call__`.
_CALL_PATH_METHODS = (
    "_call_one",
    "encode_plus",
    "batch_encode_plus",
    "_get_padding_truncation_strategies",
    "_switch_to_input_mode",
    "_encode_plus",
    "_batch_encode_plus",
    "_encode_fast",
)
_call_path_classes = {}


def _plain_call_path(cls) -> bool:
    ok = _call_path_classes.get(cls)
    if ok is None:
        base = RwkvWorldTokenizerFast
        ok = all(getattr(cls, n, None) is getattr(base, n, None) for n in _CALL_PATH_METHODS)
        _call_path_classes[cls] = ok
    return ok


class RwkvWorldTokenizerFast(PreTrainedTokenizerFast):
    """Fast RWKV World tokenizer; gives exactly the reference's ids for every string.

    Calls without offsets encode through ``encode_batch_fast``; their rows are ``LazyEncoding``s (see
    there). ``return_offsets_mapping=True`` gives real ``tokenizers.Encoding`` rows at once.
    """

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
        kwargs.setdefault("padding_side", "left")  # generate() continues from the last column: right padding would make it a pad
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
    # Calls that ask for neither offsets nor overflowing rows (and encode plain strings, no pairs) go
    # through _encode_fast: ids from encode_batch_fast, LazyEncoding rows. Everything else goes to
    # transformers. The lone-surrogate check runs only when the backend fails (it rejects such text).
    @functools.wraps(PreTrainedTokenizerFast.__call__)  # its documentation and signature
    def __call__(self, text=None, *args, **kwargs):
        # The commonest call (plain strings; no pair, target, padding, truncation or max_length) skips
        # transformers' `__call__`, `_call_one`/`encode_plus` and strategy resolution (~6 us a call, a
        # third of this tokenizer's own per-call cost on a short text): they would hand `_encode_plus` /
        # `_batch_encode_plus` "do not pad", "do not truncate", no max_length, and these arguments.
        if (
            not args
            and _plain_call(kwargs)
            and kwargs.get("return_tensors") in (None, "pt", "np")
            and _plain_call_path(type(self))
        ):
            kw = {k: v for k, v in kwargs.items() if k not in ("padding", "truncation", "max_length")}
            texts = _fast_path_texts(text, None, kw)
            if texts is not None:
                try:
                    return self._encode_fast(texts, isinstance(text, (list, tuple)), **kw)
                except Exception:
                    _check_text(text)
                    raise
        return super().__call__(text, *args, **kwargs)

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        try:
            texts = None if args else _fast_path_texts(text, text_pair, kwargs)
            if texts is not None:
                return self._encode_fast(texts, isinstance(text, (list, tuple)), **kwargs)
            return super()._encode_plus(text, text_pair, *args, **kwargs)
        except Exception:
            _check_text(text)
            _check_text(text_pair)
            raise

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):  # transformers 4.x
        try:
            texts = None if args else _fast_path_texts(batch_text_or_text_pairs, None, kwargs)
            if texts is not None and isinstance(batch_text_or_text_pairs, (list, tuple)):
                return self._encode_fast(texts, True, **kwargs)
            return super()._batch_encode_plus(batch_text_or_text_pairs, *args, **kwargs)
        except Exception:
            _check_text(batch_text_or_text_pairs)
            raise

    def _encode_fast(
        self,
        texts,
        is_batched,
        add_special_tokens=True,
        padding_strategy=None,
        truncation_strategy=None,
        max_length=None,
        stride=0,
        pad_to_multiple_of=None,
        padding_side=None,
        return_tensors=None,
        return_token_type_ids=None,
        return_attention_mask=None,
        return_special_tokens_mask=False,
        return_length=False,
        verbose=True,
        split_special_tokens=None,
        **_,
    ):
        # Same settings as transformers' own path (set_truncation_and_padding is its method).
        self.set_truncation_and_padding(
            padding_strategy=padding_strategy or PaddingStrategy.DO_NOT_PAD,
            truncation_strategy=truncation_strategy or TruncationStrategy.DO_NOT_TRUNCATE,
            max_length=max_length,
            stride=stride,
            pad_to_multiple_of=pad_to_multiple_of,
            padding_side=padding_side,
        )
        backend = self._tokenizer
        if split_special_tokens is None:
            split_special_tokens = self.split_special_tokens
        if backend.encode_special_tokens != split_special_tokens:
            backend.encode_special_tokens = split_special_tokens
        encodings = backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)

        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        input_ids = [e.ids for e in encodings]
        data = {"input_ids": input_ids}
        if return_token_type_ids:
            data["token_type_ids"] = [e.type_ids for e in encodings]
        if return_attention_mask:
            if backend.padding is None:  # nothing padded: all ones (cheaper than converting the masks)
                data["attention_mask"] = [[1] * len(ids) for ids in input_ids]
            else:
                data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_special_tokens_mask:
            data["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
        if return_length:
            data["length"] = [len(ids) for ids in input_ids]
        for ids in input_ids:
            self._eventual_warn_about_too_long_sequence(ids, max_length, verbose)

        call = _EncodeCall(self, add_special_tokens, backend)
        rows = [LazyEncoding(e, call, t) for e, t in zip(encodings, texts)]
        if not is_batched and return_tensors is None:
            data = {k: (v[0] if v and isinstance(v[0], list) else v) for k, v in data.items()}
            return BatchEncoding(data, rows)
        return BatchEncoding(data, rows, tensor_type=return_tensors)

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
