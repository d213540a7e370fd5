"""The RWKV World tokenizer (slow, pure Python).

Encoding is BlinkDL's: greedy longest match over the UTF-8 bytes of the text, against the 65,529 byte
strings of ``rwkv_vocab_v20230424.txt`` (ids 1..65529). Id 0 is ``<|endoftext|>`` (eos and pad);
ids 65530..65535 are unused and decode to nothing.

This file is copied into model folders as remote code: it imports only the standard library and
transformers.
"""

import ast
import functools
import os
import re
from typing import Optional

from transformers import BatchEncoding, PreTrainedTokenizer
from transformers.tokenization_utils_base import PaddingStrategy, TruncationStrategy

VOCAB_FILES_NAMES = {"vocab_file": "rwkv_vocab_v20230424.txt"}
VOCAB_SIZE = 65536
EOS_TOKEN = "<|endoftext|>"
FIRST_UNUSED_ID = 65530

# The World chat format, as BlinkDL's ChatRWKV demos, RWKV-Runner and llama.cpp's "rwkv-world" template
# write it: "Role: text\n\n" per message, roles System / User / Assistant, and the generation prompt
# "Assistant:" without a space (the model writes " answer"). A blank line ends a turn, so each message
# is stripped and its runs of newlines collapse to one ("\r\n" counts as a newline), as the demos do.
# Content may be a list of parts ({"type": "text", "text": ...} or plain strings, joined as they are);
# other parts (images) raise. A `tool` message is an "Observation: " turn, RWKV-Runner's name for tool
# results (llama.cpp drops them; the reply that follows needs them). An assistant message without
# content (only tool calls) is left out, as RWKV-Runner does.
CHAT_TEMPLATE = (
    "{%- set names = {'system': 'System', 'user': 'User', 'assistant': 'Assistant', 'tool': 'Observation'} -%}"
    "{%- for message in messages -%}"
    "{%- if message['role'] not in names -%}{{ raise_exception('unknown role: ' + message['role']) }}{%- endif -%}"
    "{%- if message['content'] is defined and message['content'] is not none -%}"
    "{%- set content = message['content'] -%}"
    "{%- if content is not string -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for part in content -%}"
    "{%- if part is string -%}{%- set ns.text = ns.text + part -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}"
    "{%- else -%}{{ raise_exception('RWKV World models read text only, not a ' + part['type'] + ' part') }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- set content = ns.text -%}"
    "{%- endif -%}"
    "{{ names[message['role']] + ': ' + (content.replace('\\r\\n', '\\n').split('\\n') | reject('equalto', '') | join('\\n')).strip() + '\\n\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ 'Assistant:' }}{%- endif -%}"
)


def slim_saved_config(save_directory, filename_prefix=None):
    """Drop the ordinary (non-special) added tokens from a saved ``tokenizer_config.json``.

    The fast tokenizer holds its 65,043 text tokens as added tokens; transformers would list every
    one of them in the config, duplicating ``tokenizer.json``. They are rebuilt from it on load.
    """
    import json

    path = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer_config.json")
    if not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    added = config.get("added_tokens_decoder")
    if isinstance(added, dict):
        config["added_tokens_decoder"] = {k: v for k, v in added.items() if v.get("special")}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
        f.write("\n")


# Code points U+D800..U+DFFF cannot be encoded as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")


def unused_token(index: int) -> str:
    """The display string of an unused id (65530..65535)."""
    return f"<|rwkv_unused_{index}|>"


def token_display(token: bytes) -> str:
    """A printable string naming a token: its text if it is valid UTF-8, else ``<0xHH>`` per byte."""
    try:
        return token.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(f"<0x{b:02X}>" for b in token)


def load_vocab(path: str) -> list:
    """Read the vocab file; return a list of 65536 entries: ``bytes`` for ids 1..65529, ``None`` elsewhere.

    Each line is ``<id> <python literal of str or bytes> <byte length>``. Any malformed line raises
    ``ValueError`` naming the file and the line number.
    """
    with open(path, "r", encoding="utf-8") as f:
        lines = f.read().split("\n")
    rows = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        first, last = line.find(" "), line.rfind(" ")
        if first < 0 or last <= first:
            raise ValueError(f"{path}, line {lineno}: expected '<id> <literal> <length>', got {line!r}")
        rows.append((lineno, line, first, last))
    tokens = [None] * VOCAB_SIZE
    seen = {}
    for lineno, line, first, last in rows:
        where = f"{path}, line {lineno}"
        try:
            index = int(line[:first])
            length = int(line[last + 1 :])
        except ValueError:
            raise ValueError(f"{where}: id and length must be integers, got {line!r}") from None
        try:
            value = ast.literal_eval(line[first + 1 : last].strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as e:
            raise ValueError(f"{where}: bad token literal ({e.__class__.__name__}): {line!r}") from None
        if isinstance(value, str):
            try:
                value = value.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError(f"{where}: token is not encodable as UTF-8") from None
        elif not isinstance(value, bytes):
            raise ValueError(f"{where}: token must be a str or bytes literal, got {type(value).__name__}")
        if len(value) != length:
            raise ValueError(f"{where}: token is {len(value)} bytes but the line says {length}")
        if not 1 <= index < FIRST_UNUSED_ID:
            raise ValueError(f"{where}: id {index} is outside 1..{FIRST_UNUSED_ID - 1}")
        if tokens[index] is not None:
            raise ValueError(f"{where}: duplicate id {index}")
        if not value:
            raise ValueError(f"{where}: empty token")
        if value in seen:
            raise ValueError(f"{where}: token {value!r} already has id {seen[value]}")
        seen[value] = index
        tokens[index] = value
    return tokens


def default_vocab_file() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), VOCAB_FILES_NAMES["vocab_file"])


class RwkvWorldTokenizer(PreTrainedTokenizer):
    """Slow RWKV World tokenizer: exact greedy longest byte match, as ``rwkv.rwkv_tokenizer.TRIE_TOKENIZER``.

    Token strings (``convert_ids_to_tokens``) are the token's text when its bytes are valid UTF-8,
    ``<0xE4><0xB8>``-style escapes otherwise, ``<|endoftext|>`` for id 0 and ``<|rwkv_unused_N|>``
    for the unused ids. The fast tokenizer uses the same strings.
    """

    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file=None,
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
        self.vocab_file = vocab_file
        self._id_to_bytes = load_vocab(vocab_file)
        self._build_tables()
        self.add_bos_token = add_bos_token
        super().__init__(
            eos_token=eos_token,
            pad_token=pad_token,
            bos_token=bos_token,
            unk_token=unk_token,
            add_bos_token=add_bos_token,
            clean_up_tokenization_spaces=clean_up_tokenization_spaces,
            split_special_tokens=split_special_tokens,
            **kwargs,
        )
        # transformers may have reset this attribute from kwargs; keep ours.
        self.add_bos_token = add_bos_token

    # ------------------------------------------------------------------ tables
    def _build_tables(self):
        self._bytes_to_id = {}
        for index, token in enumerate(self._id_to_bytes):
            if token is not None:
                self._bytes_to_id[token] = index
        for a in range(256):
            if bytes([a]) not in self._bytes_to_id:
                raise ValueError(f"{self.vocab_file}: byte {a:#04x} is not a token; greedy matching needs all 256")
        self._nodes = _stride3_trie(self._bytes_to_id)
        self._splitter = _word_splitter(self._bytes_to_id)
        self._segment_cache = {}
        self._id_to_token = [None] * VOCAB_SIZE
        for index, token in enumerate(self._id_to_bytes):
            self._id_to_token[index] = token_display(token) if token is not None else unused_token(index)
        self._id_to_token[0] = EOS_TOKEN
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}

    def __getstate__(self):
        # the cache of matched pieces is not part of the tokenizer: leaving it out keeps pickles, copies
        # and the hashes that `datasets.map` takes of a tokenizer the same before and after use
        state = self.__dict__.copy()
        state["_segment_cache"] = {}
        return state

    # ------------------------------------------------------------------ encoding
    def encode_bytes(self, data: bytes) -> list:
        """Greedy longest match over ``data``; returns ids.

        ``data`` is first cut before the spaces that no token can cross (see `_word_splitter`):
        greedy matching ends a token there whatever follows, so the pieces are matched on their own,
        and short pieces (words, mostly) are remembered.
        """
        cache = self._segment_cache
        if len(cache) > _SEGMENT_CACHE_SIZE:
            cache.clear()
        out = []
        extend = out.extend
        match = self._match
        for segment in self._splitter.split(data):
            ids = cache.get(segment)
            if ids is None:
                ids = match(segment)
                if len(segment) <= _SEGMENT_CACHE_MAX_BYTES:
                    # a tuple of ints: the garbage collector stops tracking it, so a full cache does
                    # not make every collection longer
                    cache[segment] = tuple(ids)
            extend(ids)
        return out

    def _match(self, data: bytes) -> list:
        """Greedy longest match over ``data`` with a trie walked three bytes at a time (see
        `_stride3_trie`): from the deepest node that ``data`` reaches, try its few token lengths,
        else take its precomputed fallback."""
        out = []
        append = out.append
        lookup = self._bytes_to_id
        nodes = self._nodes
        pos, end = 0, len(data)
        last = end - 3  # a deeper node needs 3 more bytes: pos + depth <= last
        while pos < end:
            node = nodes.get(data[pos : pos + 3])
            if node is None:  # no token of 3+ bytes starts here: the 2-byte token or the byte
                index = lookup.get(data[pos : pos + 2])
                if index is None:
                    index = lookup[data[pos : pos + 1]]
                    pos += 1
                else:
                    pos += 2  # (past the end if only one byte was left: the loop ends all the same)
                append(index)
                continue
            depth = 3
            while node[1] and pos + depth <= last:
                deeper = nodes.get(data[pos : pos + depth + 3])
                if deeper is None:
                    break
                node = deeper
                depth += 3
            for n in node[0]:
                index = lookup.get(data[pos : pos + n])
                if index is not None:
                    pos += n  # a slice cut short by the end of data is the rest of it: the loop ends
                    break
            else:
                index = node[3]
                pos += node[2]
            append(index)
        return out

    def encode_text(self, text: str) -> list:
        """Ids for ``text`` exactly as the reference tokenizer gives them (no special tokens)."""
        if not isinstance(text, str):
            raise TypeError(f"expected str, got {type(text).__name__}")
        return self.encode_bytes(_utf8(text))

    def _tokenize(self, text, **kwargs):
        names = self._id_to_token
        return [names[i] for i in self.encode_text(text)]

    def tokenize(self, text, **kwargs):
        """Token strings of ``text``. With ``split_special_tokens`` (our default: a literal
        ``<|endoftext|>`` is text, as in the reference) the result also carries the ids, so that
        ``__call__`` (tokenize, then `convert_tokens_to_ids`) does not look every token up again."""
        split = kwargs.pop("split_special_tokens", self.split_special_tokens)
        if not split or not isinstance(text, str):
            return super().tokenize(text, split_special_tokens=split, **kwargs)
        text, _ = self.prepare_for_tokenization(text, **kwargs)
        ids = self.encode_text(text)
        tokens = _Tokens(map(self._id_to_token.__getitem__, ids))
        tokens.ids = ids
        return tokens

    # ------------------------------------------------------------------ __call__
    # transformers' own path for a plain string costs ~45 us a call on top of the encoding (the token
    # strings, `prepare_for_model`, strategies resolved three times, `pad`). Calls that encode plain
    # strings (one, or a batch of them) with no pair, no pre-split words, no overflowing rows and no
    # offsets go through `_encode_lean`, which builds the same BatchEncoding directly; anything else,
    # or any case it does not cover (see there), takes transformers' path unchanged.
    @functools.wraps(PreTrainedTokenizer.__call__)  # its documentation and signature
    def __call__(self, text=None, *args, **kwargs):
        # The commonest call (no padding, no truncation, no pair, no target) skips transformers'
        # `__call__` too: its strategies are then "do not pad", "do not truncate", no max_length.
        if not args and _plain_call(kwargs):
            if type(text) is str:
                out = self._encode_lean((text,), False, kwargs, _CALL_KEYS)
            elif _str_batch(text):
                out = self._encode_lean(text, True, kwargs, _CALL_KEYS)
            else:
                out = None
            if out is not None:
                return out
        return super().__call__(text, *args, **kwargs)

    def _switch_to_input_mode(self):
        # (a no-op, as transformers 4 defines it: with it, transformers 5's `__call__` does not go
        # through its slow `__getattr__` to find out that it is missing)
        pass

    def _encode_plus(self, text, text_pair=None, *args, **kwargs):
        if not args and text_pair is None:
            if type(text) is str:
                out = self._encode_lean((text,), False, kwargs)
                if out is not None:
                    return out
            elif (  # transformers 5 encodes batches here too
                _BATCHES_IN_ENCODE_PLUS and _str_batch(text)
            ):
                out = self._encode_lean(text, True, kwargs)
                if out is not None:
                    return out
        return super()._encode_plus(text, text_pair, *args, **kwargs)

    def _batch_encode_plus(self, batch_text_or_text_pairs, *args, **kwargs):  # transformers 4.x
        texts = batch_text_or_text_pairs
        if not args and _str_batch(texts):
            out = self._encode_lean(texts, True, kwargs)
            if out is not None:
                return out
        return super()._batch_encode_plus(texts, *args, **kwargs)

    def _encode_lean(self, texts, batched, kw, keys=None):
        """The BatchEncoding that transformers' `_encode_plus` (one text; a batch on 5.x) or
        `_batch_encode_plus` (a batch, 4.x) would build for ``texts``, or None where this path does not
        cover the call (the caller then takes transformers' path). ``kw``: that method's keyword
        arguments, or `__call__`'s (``keys=_CALL_KEYS``, checked by the caller to mean no padding and
        no truncation). Everything that makes it give up is decided before any side effect (the
        long-sequence warning)."""
        if not (keys or _LEAN_KEYS).issuperset(kw) or not _lean_class(type(self)):
            return None
        get = kw.get
        if get("is_split_into_words") or get("return_overflowing_tokens") or get("return_offsets_mapping"):
            return None
        # transformers 4's batch path does not hand split_special_tokens to tokenize(): require both
        if not (self.split_special_tokens and get("split_special_tokens", True)):
            return None
        if self.model_input_names[0] != "input_ids":
            return None
        add_special = get("add_special_tokens", True)
        padding = get("padding_strategy", _DO_NOT_PAD)
        truncation = get("truncation_strategy", _DO_NOT_TRUNCATE)
        max_length = get("max_length")
        truncate = False
        if truncation is not _DO_NOT_TRUNCATE:
            if truncation is not TruncationStrategy.LONGEST_FIRST and truncation is not TruncationStrategy.ONLY_FIRST:
                return None  # only_second (no effect on one sequence), or not an enum member
            # (max_length None: prepare_for_model would resolve the strategy again; an odd truncation
            # side: 4.x raises, 5.x cuts on the right)
            if max_length is None or self.truncation_side not in ("left", "right"):
                return None
            truncate = bool(max_length)
        if padding is not _DO_NOT_PAD:
            if padding is PaddingStrategy.MAX_LENGTH:
                if max_length is None:
                    return None
            elif padding is not PaddingStrategy.LONGEST:
                return None
            pad_to_multiple_of = get("pad_to_multiple_of")
            if self.pad_token is None or (  # the errors of transformers' strategy checks
                truncation is not _DO_NOT_TRUNCATE
                and pad_to_multiple_of is not None
                and max_length % pad_to_multiple_of != 0
            ):
                return None
        return_token_type_ids = get("return_token_type_ids")
        if return_token_type_ids is None:
            return_token_type_ids = "token_type_ids" in self.model_input_names
        if return_token_type_ids and not add_special:  # 4.x raises
            return None
        return_attention_mask = get("return_attention_mask")
        if return_attention_mask is None:
            return_attention_mask = "attention_mask" in self.model_input_names
        bos = 1 if add_special and self.add_bos_token else 0
        left = self.truncation_side == "left"

        rows = []
        prepare, encode = self.prepare_for_tokenization, self.encode_text
        for text in texts:
            ids = encode(prepare(text)[0])
            if truncate:
                remove = len(ids) + bos - max_length
                if remove > 0:
                    if remove >= len(ids):  # 4.x logs an error and keeps them all, 5.x drops them all
                        return None
                    ids = ids[remove:] if left else ids[:-remove]
            rows.append(ids)
        if not batched:
            ids = rows[0]
            if not ids and not bos:  # `pad` returns an empty sequence early, unpadded
                return None
            return self._lean_single(ids, bos, kw, padding, max_length, return_token_type_ids, return_attention_mask)

        sequences = [[0] + ids for ids in rows] if bos else rows
        warn, verbose = self._eventual_warn_about_too_long_sequence, get("verbose", True)
        for sequence in sequences:
            warn(sequence, max_length, verbose)
        data = {"input_ids": sequences}
        if return_token_type_ids:
            data["token_type_ids"] = [[0] * len(s) for s in sequences]
        if get("return_special_tokens_mask"):
            if add_special:
                data["special_tokens_mask"] = [self.get_special_tokens_mask(ids) for ids in rows]
            else:
                data["special_tokens_mask"] = [[0] * len(s) for s in sequences]
        if get("return_length"):  # each row's length before the batch is padded
            data["length"] = [len(s) for s in sequences]
        if padding is not _DO_NOT_PAD:
            if padding is PaddingStrategy.LONGEST:
                max_length = max(map(len, sequences))
                padding = PaddingStrategy.MAX_LENGTH
            pad, pad_to_multiple_of, padding_side = self._pad, get("pad_to_multiple_of"), get("padding_side")
            keys = list(data)
            padded = {}
            for i in range(len(sequences)):
                row = pad(
                    {k: data[k][i] for k in keys},
                    max_length=max_length,
                    padding_strategy=padding,
                    pad_to_multiple_of=pad_to_multiple_of,
                    padding_side=padding_side,
                    return_attention_mask=return_attention_mask,
                )
                for key, value in row.items():
                    padded.setdefault(key, []).append(value)
            data = padded
        elif return_attention_mask:
            data["attention_mask"] = [[1] * len(s) for s in sequences]
        return BatchEncoding(data, tensor_type=get("return_tensors"))

    def _lean_single(self, ids, bos, kw, padding, max_length, return_token_type_ids, return_attention_mask):
        """`_encode_lean` for one text: what `prepare_for_model` builds from its (truncated) ids."""
        get = kw.get
        sequence = [0] + ids if bos else ids
        self._eventual_warn_about_too_long_sequence(sequence, max_length, get("verbose", True))
        data = {"input_ids": sequence}
        if return_token_type_ids:
            data["token_type_ids"] = [0] * len(sequence)
        if get("return_special_tokens_mask"):
            if get("add_special_tokens", True):
                data["special_tokens_mask"] = self.get_special_tokens_mask(ids)
            else:
                data["special_tokens_mask"] = [0] * len(sequence)
        if padding is not _DO_NOT_PAD:
            data = self._pad(
                data,
                max_length=max_length,
                padding_strategy=padding,
                pad_to_multiple_of=get("pad_to_multiple_of"),
                padding_side=get("padding_side"),
                return_attention_mask=return_attention_mask,
            )
        elif return_attention_mask:
            data["attention_mask"] = [1] * len(sequence)
        if get("return_length"):
            data["length"] = len(data["input_ids"])
        return BatchEncoding(data, tensor_type=get("return_tensors"), prepend_batch_axis=True)

    def convert_tokens_to_ids(self, tokens):
        # `tokenize`'s own result, unchanged since: its ids (the comparison runs in C)
        if type(tokens) is _Tokens and list(map(self._id_to_token.__getitem__, tokens.ids)) == tokens:
            return list(tokens.ids)
        return super().convert_tokens_to_ids(tokens)

    def _convert_token_to_id(self, token):
        index = self._token_to_id.get(token)
        if index is None:
            raise ValueError(f"unknown token {token!r}")
        return index

    def _convert_id_to_token(self, index):
        return self._id_to_token[_check_id(index)]

    def get_vocab(self):
        vocab = dict(self._token_to_id)
        vocab.update(self.added_tokens_encoder)
        return vocab

    @property
    def vocab_size(self):
        return VOCAB_SIZE

    def __len__(self):
        return VOCAB_SIZE

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [0] if self.add_bos_token else []
        out = bos + list(token_ids_0)
        if token_ids_1 is not None:
            out += bos + list(token_ids_1)
        return out

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [1 if i == 0 else 0 for i in token_ids_0]
        bos = [1] if self.add_bos_token else []
        mask = bos + [0] * len(token_ids_0)
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1)
        return mask

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def num_special_tokens_to_add(self, pair=False):
        return (2 if pair else 1) if self.add_bos_token else 0

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids, skip_special_tokens=False) -> bytes:
        table = self._id_to_bytes
        parts = []
        for index in ids:
            index = _check_id(index)
            token = table[index]
            if token is not None:
                parts.append(token)
            elif index == 0 and not skip_special_tokens:
                parts.append(EOS_TOKEN.encode("ascii"))
        return b"".join(parts)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs):
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self.decode_bytes(token_ids, skip_special_tokens).decode("utf-8", errors="replace")

    def convert_tokens_to_string(self, tokens):
        return self.decode_bytes([self._convert_token_to_id(t) for t in tokens]).decode("utf-8", errors="replace")

    # ------------------------------------------------------------------ saving
    def save_pretrained(self, save_directory, *args, **kwargs):
        files = super().save_pretrained(save_directory, *args, **kwargs)
        slim_saved_config(save_directory, kwargs.get("filename_prefix"))
        return files

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not os.path.isdir(save_directory):
            raise ValueError(f"{save_directory} is not a directory")
        name = (filename_prefix + "-" if filename_prefix else "") + VOCAB_FILES_NAMES["vocab_file"]
        path = os.path.join(save_directory, name)
        with open(self.vocab_file, "rb") as src, open(path, "wb") as dst:
            dst.write(src.read())
        return (path,)



# The arguments transformers hands `_encode_plus` / `_batch_encode_plus` that `_encode_lean` knows.
_LEAN_KEYS = frozenset(
    (
        "add_special_tokens",
        "padding_strategy",
        "truncation_strategy",
        "max_length",
        "stride",  # only shapes overflowing rows, which the lean path never returns
        "is_split_into_words",
        "pad_to_multiple_of",
        "padding_side",
        "return_tensors",
        "return_token_type_ids",
        "return_attention_mask",
        "return_overflowing_tokens",
        "return_special_tokens_mask",
        "return_offsets_mapping",
        "return_length",
        "verbose",
        "split_special_tokens",
    )
)
# The arguments of `__call__` that its own lean path takes (with padding, truncation and max_length
# at their defaults); `_encode_lean` checks the rest as it does for `_encode_plus`.
_CALL_KEYS = (_LEAN_KEYS - {"padding_strategy", "truncation_strategy"}) | {"padding", "truncation"}


def _plain_call(kwargs) -> bool:
    """`__call__` arguments that only say "do not pad, do not truncate, no max_length" (and _CALL_KEYS'
    others): the calls both tokenizers' `__call__` shortcuts take."""
    return (
        _CALL_KEYS.issuperset(kwargs)
        and kwargs.get("padding", False) is False
        and (kwargs.get("truncation") is None or kwargs.get("truncation") is False)
        and kwargs.get("max_length") is None
    )
_DO_NOT_PAD = PaddingStrategy.DO_NOT_PAD
_DO_NOT_TRUNCATE = TruncationStrategy.DO_NOT_TRUNCATE
# transformers 5 has no _batch_encode_plus: its _encode_plus takes batches
_BATCHES_IN_ENCODE_PLUS = not hasattr(PreTrainedTokenizer, "_batch_encode_plus")
# The methods `_encode_lean` stands in for; a subclass that overrides one takes transformers' path.
_LEAN_METHODS = (
    "_encode_plus",
    "_batch_encode_plus",
    "_batch_prepare_for_model",
    "prepare_for_tokenization",
    "tokenize",
    "convert_tokens_to_ids",
    "build_inputs_with_special_tokens",
    "create_token_type_ids_from_sequences",
    "num_special_tokens_to_add",
    "prepare_for_model",
    "truncate_sequences",
    "pad",
    "_pad",
    "get_special_tokens_mask",
    "_eventual_warn_about_too_long_sequence",
)
_lean_classes = {}


def _str_batch(texts) -> bool:
    """A non-empty list or tuple of plain strings: a batch the lean path encodes."""
    return type(texts) in (list, tuple) and bool(texts) and all(type(t) is str for t in texts)


def _lean_class(cls) -> bool:
    ok = _lean_classes.get(cls)
    if ok is None:
        base = RwkvWorldTokenizer
        ok = _lean_classes[cls] = all(getattr(cls, n, None) is getattr(base, n, None) for n in _LEAN_METHODS)
    return ok


class _Tokens(list):
    """`RwkvWorldTokenizer.tokenize`'s result: the token strings, and their ids in ``.ids``."""

    __slots__ = ("ids",)


_SEGMENT_CACHE_SIZE = 100_000  # pieces remembered by `encode_bytes` before the cache starts over
_SEGMENT_CACHE_MAX_BYTES = 48


def _word_splitter(bytes_to_id: dict) -> "re.Pattern":
    """A pattern that cuts bytes where no token can cross: before a space, after most bytes.

    A token crosses the boundary between bytes x and y only if it contains "xy". Before a space, the
    World vocabulary has such tokens only for x in "\t\n " ("\n ", "  ", ...), so the boundary
    before the space in "of the" ends a token of the greedy match whatever follows, and the text on
    either side can be matched alone. The places are computed from the vocabulary, so they hold for
    any vocabulary file. (Cutting before "." or "," as well gives fewer distinct pieces, but `re`
    then tries every lookbehind at every byte, which costs more than it saves.)
    """
    crossing = {token[i - 1] for token in bytes_to_id for i in range(1, len(token)) if token[i] == 0x20}
    if len(crossing) == 256:
        return re.compile(b"(?!)")  # never cuts
    either = b"".join(re.escape(bytes([x])) for x in sorted(crossing))
    return re.compile(b"(?<=[^" + either + b"])(?= )")


def _stride3_trie(bytes_to_id: dict) -> dict:
    """The vocabulary's trie, one level per three bytes, for `RwkvWorldTokenizer.encode_bytes`.

    Keys: every prefix of length 3, 6, 9, ... of a token. Values: ``(lengths, deeper, fb_len, fb_id)``
    with ``lengths`` the lengths in ``[depth, depth + 3)`` of the tokens that start with the key,
    longest first; ``deeper`` whether a key three bytes longer extends it; ``(fb_len, fb_id)`` the
    longest token shorter than ``depth`` that is a prefix of the key (every byte is a token, so one
    exists). Greedy longest match walks down while the text extends the key, then takes the first of
    ``lengths`` that is a token of the text, else the fallback.
    """
    lengths = {}
    for token in bytes_to_id:
        for depth in range(3, len(token) + 1, 3):
            lengths.setdefault(token[:depth], [])
        if len(token) >= 3:
            lengths[token[: len(token) - len(token) % 3]].append(len(token))
    deeper = {key[:-3] for key in lengths if len(key) > 3}
    nodes = {}
    for key in sorted(lengths, key=len):  # parents first
        depth = len(key)
        fallback = None
        if depth > 3:  # the parent's own lengths, else the parent's fallback
            parent = nodes[key[:-3]]
            fallback = next(((n, bytes_to_id[key[:n]]) for n in parent[0] if key[:n] in bytes_to_id), parent[2:])
        else:
            n = 2 if key[:2] in bytes_to_id else 1
            fallback = (n, bytes_to_id[key[:n]])
        nodes[key] = (tuple(sorted(lengths[key], reverse=True)), key in deeper) + tuple(fallback)
    return nodes

def _utf8(text: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        m = _SURROGATE.search(text)
        where = f" U+{ord(m.group()):04X} at index {m.start()}" if m else ""
        raise ValueError(f"text contains a lone surrogate{where}; it cannot be encoded as UTF-8") from None


def _check_id(index) -> int:
    try:
        value = int(index)
    except (TypeError, ValueError):
        raise ValueError(f"token id {index!r} is not an integer") from None
    if not 0 <= value < VOCAB_SIZE:
        raise ValueError(f"token id {index!r} is outside 0..{VOCAB_SIZE - 1}")
    return value
