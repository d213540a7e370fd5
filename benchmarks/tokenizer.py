"""Tokenizer throughput: MB/s and tokens/s on a fixed mixed corpus (not a test).

    python benchmarks/tokenizer.py [--repeat 3]

Corpus (deterministic): all LAMBADA test texts; the first 2 MB of transformers' own .py sources read
in sorted order; 0.5 MB of Chinese from a fixed set of sentences repeated in a seeded order plus
seeded random CJK code points. Each tokenizer encodes every document; "batched" passes the whole
list at once (the fast tokenizer and pyrwkv-tokenizer use threads there). RwkvWorldTokenizerFast
__call__ asks for no offsets here, so it takes its encode_batch_fast path (offsets are computed when
a row's tokens/offsets/char_to_token are first used). "exact" says whether every
document's ids equal the reference TRIE_TOKENIZER's.
"""

import argparse
import importlib.resources
import json
import os
import platform
import random
import time
from pathlib import Path

CHINESE = [
    "今天天气很好，我们一起去公园散步吧。",
    "这本书讲述了一个普通人努力改变命运的故事。",
    "科学技术的发展让人们的生活变得更加方便。",
    "他每天早上六点起床，先跑步再吃早饭。",
    "学习一门新的语言需要耐心和大量的练习。",
    "城市的夜晚灯火通明，街道上依然很热闹。",
    "请把窗户关上，外面开始下雨了。",
    "我们应该珍惜时间，认真对待每一件事情。",
]


def corpus():
    docs = []
    data = importlib.resources.files("rwkv_hf.evaluation").joinpath("lambada_test.jsonl").read_text("utf-8")
    docs += [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
    import transformers

    root = Path(transformers.__file__).parent
    total = 0
    for path in sorted(root.rglob("*.py")):
        text = path.read_text("utf-8", errors="replace")
        docs.append(text)
        total += len(text.encode())
        if total > 2_000_000:
            break
    rnd = random.Random(0)
    zh = []
    while sum(len(s.encode()) for s in zh) < 500_000:
        para = "".join(rnd.choice(CHINESE) for _ in range(20))
        para += "".join(chr(rnd.randrange(0x4E00, 0x9FA6)) for _ in range(40)) + "\n"
        zh.append(para)
    docs += zh
    return docs


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def cpu_model():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    from rwkv_hf.tokenization import RwkvWorldTokenizer, RwkvWorldTokenizerFast

    docs = corpus()
    nbytes = sum(len(d.encode()) for d in docs)
    ref = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    t_ref, expected = timed(lambda: [ref.encode(d) for d in docs], 1)
    ntok = sum(map(len, expected))
    slow, fast = RwkvWorldTokenizer(), RwkvWorldTokenizerFast()

    rows = [("reference TRIE_TOKENIZER (rwkv 0.8.32)", "single", t_ref, True)]

    def add(name, mode, fn, repeat=args.repeat):
        t, out = timed(fn, repeat)
        rows.append((name, mode, t, [list(x) for x in out] == expected))

    # The slow tokenizer remembers the pieces it matched (words, mostly): its first pass over the
    # corpus ("cold") is what tokenizing a data set once costs; later passes ("warm") hit the cache.
    add("RwkvWorldTokenizer.encode_text (slow)", "single, cold", lambda: [slow.encode_text(d) for d in docs], 1)
    add("RwkvWorldTokenizer.encode_text (slow)", "single, warm", lambda: [slow.encode_text(d) for d in docs])
    slow = RwkvWorldTokenizer()
    add("RwkvWorldTokenizer __call__ (slow)", "single, cold", lambda: [slow(d)["input_ids"] for d in docs], 1)
    add("RwkvWorldTokenizer __call__ (slow)", "single, warm", lambda: [slow(d)["input_ids"] for d in docs])
    add("RwkvWorldTokenizerFast __call__", "single", lambda: [fast(d)["input_ids"] for d in docs])
    add("RwkvWorldTokenizerFast __call__", "batched", lambda: fast(docs)["input_ids"])
    add(
        "RwkvWorldTokenizerFast __call__, return_offsets_mapping",
        "single",
        lambda: [fast(d, return_offsets_mapping=True)["input_ids"] for d in docs],
    )
    add(
        "RwkvWorldTokenizerFast __call__, return_offsets_mapping",
        "batched",
        lambda: fast(docs, return_offsets_mapping=True)["input_ids"],
    )
    backend = fast.backend_tokenizer
    add("tokenizer.json via tokenizers", "single", lambda: [backend.encode(d).ids for d in docs])
    add("tokenizer.json via tokenizers", "batched", lambda: [e.ids for e in backend.encode_batch(docs)])
    fast_rows = backend.encode_batch_fast
    add("tokenizer.json, encode_batch_fast (no offsets)", "single", lambda: [fast_rows([d])[0].ids for d in docs])
    add("tokenizer.json, encode_batch_fast (no offsets)", "batched", lambda: [e.ids for e in fast_rows(docs)])
    try:
        import pyrwkv_tokenizer

        rs = pyrwkv_tokenizer.RWKVTokenizer()
        add("pyrwkv-tokenizer (Rust)", "single", lambda: [rs.encode(d) for d in docs])
        add("pyrwkv-tokenizer (Rust)", "batched", lambda: rs.encode_batch(docs))
    except ImportError:
        rows.append(("pyrwkv-tokenizer (Rust): not installed", "-", float("nan"), None))

    print(f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu_model()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},"
        f" tokenizers {tokenizers.__version__}"
    )
    print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.2f} MB UTF-8, {ntok} tokens\n")
    print("| tokenizer | mode | seconds | MB/s | Mtokens/s | x reference | exact |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, mode, t, exact in rows:
        mb = nbytes / 1e6 / t
        print(
            f"| {name} | {mode} | {t:.2f} | {mb:.2f} | {ntok / 1e6 / t:.3f} | {t_ref / t:.2f} |"
            f" {'n/a' if exact is None else ('yes' if exact else 'NO')} |"
        )


if __name__ == "__main__":
    main()
