"""Build the ``tokenizer.json`` of the RWKV World tokenizer, which the ``tokenizers`` library runs alone.

The reference encodes by greedy longest match over UTF-8 bytes. The pipeline reproduces it exactly:

1. Added tokens (Aho-Corasick, leftmost-longest, on the raw text): the 65,043 tokens whose bytes are
   valid UTF-8, ``normalized=False``, not special. Every ASCII byte is one of them. At a character
   boundary the greedy choice is always one of these when any of them matches there, because a
   partial-byte token starting at a boundary is shorter than the character it lies in, and so shorter
   than any valid token starting there. Leftmost-longest takes the same token at the same place.
2. What no added token covers are whole characters that start no valid token. The 486 tokens that
   are not valid UTF-8 (single bytes 0x80-0xFF; a lead byte plus one continuation byte; two
   continuation bytes) never cross a character boundary, so greedy matching inside each character
   is all that is left. The normalizer spells each byte of those characters as ``<0xHH>``
   (ByteLevel, then one Replace per high byte), the pre-tokenizer isolates one character per word, and
   a WordPiece model with an empty continuing prefix takes the longest prefix in its vocab, which is
   greedy longest match inside the character.
3. The decoder maps ``<0xHH>`` back to bytes through the ByteLevel decoder. Text tokens whose
   characters all lie in the ByteLevel alphabet (like ``é``) would be misread as bytes, so a private
   use character is put in front of every such character first (making the token "not byte-level",
   which ByteLevel passes through as UTF-8), and removed at the end. Unused ids decode to nothing.

Imports only the standard library; ``build_tokenizer_json`` returns the JSON text (deterministic).
"""

import json

PRIVATE_MARK = "\ue000"
UNUSED_PATTERN = r"^<\|rwkv_unused_\d+\|>$"


def bytes_to_unicode():
    """The ByteLevel alphabet of the ``tokenizers`` library (GPT-2's): byte -> character."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    table = {b: chr(b) for b in keep}
    extra = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _char_class(chars):
    chars = sorted(set(chars))
    ranges, start, prev = [], None, None
    for c in chars:
        o = ord(c)
        if start is None:
            start = prev = o
        elif o == prev + 1:
            prev = o
        else:
            ranges.append((start, prev))
            start = prev = o
    if start is not None:
        ranges.append((start, prev))
    return "[" + "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in ranges) + "]"


def escape_bytes(token: bytes) -> str:
    return "".join(f"<0x{b:02X}>" for b in token)


def build_tokenizer_json(id_to_token, id_to_bytes) -> str:
    """``id_to_token``: the 65536 display strings; ``id_to_bytes``: bytes or None per id."""
    byte_char = bytes_to_unicode()
    vocab = {}
    added = []
    for index, name in enumerate(id_to_token):
        if name in vocab:
            raise ValueError(f"token string {name!r} used by ids {vocab[name]} and {index}")
        vocab[name] = index
        token = id_to_bytes[index]
        if token is None:
            continue
        try:
            text = token.decode("utf-8")
        except UnicodeDecodeError:
            if name != escape_bytes(token):
                raise ValueError(f"id {index}: partial-byte token must be named {escape_bytes(token)!r}")
            continue
        if text != name:
            raise ValueError(f"id {index}: text token must be named by its text")
        if "<0x" in text:
            raise ValueError(f"id {index}: text token {text!r} contains '<0x'; it would clash with byte names")
        if PRIVATE_MARK in text:
            raise ValueError(f"id {index}: text token contains the private mark U+{ord(PRIVATE_MARK):04X}")
        added.append(
            {
                "id": index,
                "content": text,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": False,
            }
        )

    high = range(0x80, 0x100)
    normalizer = {
        "type": "Sequence",
        "normalizers": [{"type": "ByteLevel"}]
        + [{"type": "Replace", "pattern": {"String": byte_char[b]}, "content": f"<0x{b:02X}>"} for b in high],
    }
    # One character = a lead byte (0xC0-0xFF) and its continuation bytes (0x80-0xBF).
    pre_tokenizer = {
        "type": "Split",
        "pattern": {"Regex": "<0x[C-F][0-9A-F]>(?:<0x[89AB][0-9A-F]>)*"},
        "behavior": "Isolated",
        "invert": False,
    }
    model = {
        "type": "WordPiece",
        "unk_token": id_to_token[0],
        "continuing_subword_prefix": "",
        "max_input_chars_per_word": 100,
        "vocab": vocab,
    }
    alphabet = _char_class(c for c in byte_char.values() if ord(c) >= 0x80)
    decoder = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"Regex": UNUSED_PATTERN}, "content": ""},
            {"type": "Replace", "pattern": {"Regex": f"(?={alphabet})"}, "content": PRIVATE_MARK},
        ]
        + [{"type": "Replace", "pattern": {"String": f"<0x{b:02X}>"}, "content": byte_char[b]} for b in high]
        + [
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            {"type": "Replace", "pattern": {"Regex": f"{PRIVATE_MARK}(?={alphabet})"}, "content": ""},
        ],
    }
    doc = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": normalizer,
        "pre_tokenizer": pre_tokenizer,
        "post_processor": None,
        "decoder": decoder,
        "model": model,
    }
    return json.dumps(doc, ensure_ascii=False, indent=None, separators=(",", ":"))
