"""Build the ``tokenizer.json`` of the RWKV World tokenizer, which the ``tokenizers`` library runs alone.

The reference encodes by greedy longest match over UTF-8 bytes. The pipeline reproduces it exactly:

1. Added tokens (Aho-Corasick, leftmost-longest, on the raw text): the 65,043 tokens whose bytes are
   valid UTF-8, ``normalized=False``, not special. Every ASCII byte is one of them. At a character
   boundary the greedy choice is always one of these when any of them matches there, because a
   partial-byte token starting at a boundary is shorter than the character it lies in, and so shorter
   than any valid token starting there. Leftmost-longest takes the same token at the same place.
2. What no added token covers are whole characters that start no valid token. The 486 tokens that
   are not valid UTF-8 are single bytes 0x80-0xFF, a lead byte plus one continuation byte, or two
   continuation bytes: none crosses a character boundary, so greedy matching inside each character
   is all that is left. The model does it with no normalizer and no pre-tokenizer: a BPE model whose
   byte fallback spells each byte of such a character as its single-byte token ``<0xHH>``, with one
   merge per two-byte token. Greedy and BPE agree inside a character when every lead+continuation
   merge ranks before every continuation+continuation merge (a character has one lead byte, at its
   start) and, of two continuation merges that overlap in a 4-byte character (xy and yz of Lxyz),
   the left one ranks first (``_merge_order``). No merge joins bytes of two characters (a character
   starts with a lead byte, and no merge ends with one). ``build_tokenizer_json`` raises for a
   vocabulary where these do not hold.

   Each byte of the text maps back to its whole character, so every partial token's offsets are the
   character's, as with the ByteLevel normalizer this once took. This replaces a normalizer with 129
   steps (ByteLevel, then one regex Replace per high byte) plus a regex pre-tokenizer and WordPiece,
   which ran for every stretch of such characters: 5-10x slower than the reference on emoji chat and
   rare code points.
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


def _is_continuation(b):
    return 0x80 <= b <= 0xBF


def _merge_order(pairs):
    """The two-byte partial tokens in BPE merge order (see the module docstring), or ValueError.

    ``pairs``: (first byte, second byte) in id order. Lead+continuation pairs first (in id order),
    then the continuation pairs so that xy comes before yz (a topological order, by byte value among
    those free to go next).
    """
    lead = [t for t in pairs if not _is_continuation(t[0])]
    cont = sorted(t for t in pairs if _is_continuation(t[0]))
    before = {t: [u for u in cont if u[0] == t[1]] for t in cont}  # t must rank before each u
    waiting = {t: 0 for t in cont}
    for t in cont:
        for u in before[t]:
            waiting[u] += 1
    order, free = [], [t for t in cont if waiting[t] == 0]
    while free:
        free.sort(reverse=True)
        t = free.pop()
        order.append(t)
        for u in before[t]:
            waiting[u] -= 1
            if waiting[u] == 0:
                free.append(u)
    if len(order) != len(cont):
        stuck = sorted(escape_bytes(t) for t in cont if waiting[t])
        raise ValueError(f"continuation-byte tokens {stuck} overlap in a cycle; no BPE merge order matches greedy")
    return lead + order


def build_tokenizer_json(id_to_token, id_to_bytes) -> str:
    """``id_to_token``: the 65536 display strings; ``id_to_bytes``: bytes or None per id."""
    byte_char = bytes_to_unicode()
    vocab = {}
    added = []
    pairs = []
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
            if len(token) == 2 and token[0] >= 0x80 and _is_continuation(token[1]):
                pairs.append((token[0], token[1], index))
            elif len(token) != 1:
                raise ValueError(
                    f"id {index}: partial-byte token {name} is not a single byte, a lead byte plus a"
                    " continuation byte or two continuation bytes; greedy matching inside a character"
                    " is built for those only"
                )
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
    missing = [escape_bytes(bytes([b])) for b in high if escape_bytes(bytes([b])) not in vocab]
    if missing:
        raise ValueError(f"single-byte tokens {missing} are missing; every byte 0x80-0xFF must be a token")
    order = _merge_order([(a, b) for a, b, _ in sorted(pairs, key=lambda p: p[2])])
    model = {
        "type": "BPE",
        "dropout": None,
        "unk_token": None,
        "continuing_subword_prefix": None,
        "end_of_word_suffix": None,
        "fuse_unk": False,
        "byte_fallback": True,
        "ignore_merges": False,
        "vocab": vocab,
        "merges": [[escape_bytes(bytes([a])), escape_bytes(bytes([b]))] for a, b in order],
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
        "normalizer": None,
        "pre_tokenizer": None,
        "post_processor": None,
        "decoder": decoder,
        "model": model,
    }
    return json.dumps(doc, ensure_ascii=False, indent=None, separators=(",", ":"))
