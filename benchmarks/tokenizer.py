"""Tokenizer throughput: MB/s and tokens/s on a fixed mixed corpus (not a test).

    python benchmarks/tokenizer.py [--repeat 3]

Corpus (deterministic): all LAMBADA test texts; the first 2 MB of transformers' own .py sources read
in sorted order; 0.5 MB of Chinese from a fixed set of sentences repeated in a seeded order plus
seeded random CJK code points. Each tokenizer encodes every document; "batched" passes the whole
list at once (the fast tokenizer and pyrwkv-tokenizer use threads there). RwkvWorldTokenizerFast
__call__ asks for no offsets here, so it takes its encode_batch_fast path (offsets are computed when
a row's tokens/offsets/char_to_token are first used). "exact" says whether every
document's ids equal the reference TRIE_TOKENIZER's.

A second table ("kinds of text", ``--only kinds``) times the reference and the fast tokenizer (one
document at a time, and batched) on five kinds of text, ~0.4 MB each, every row best of
``--kinds-repeat``; see ``KINDS`` for where each text comes from.

``--only cost`` prints what one document at a time costs per token on the same texts, in CPU time of
this process (pin it: ``taskset -c 0``): the reference, ``tokenizers`` alone (``encode_batch_fast``, and
``encode_batch`` with offsets), and ``RwkvWorldTokenizerFast.__call__`` (without and with
``return_offsets_mapping``); the variants take turns, best of ``--kinds-repeat`` each.
"""

import argparse
import gettext
import glob
import importlib.resources
import json
import os
import platform
import random
import time
import unicodedata
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


# ------------------------------------------------------------------------------ kinds of text
# One corpus per kind of text, each ~KIND_BYTES of UTF-8 in documents of ~1-3 KB, built
# deterministically from what is on disk: gettext catalogs (/usr/share/locale/*/LC_MESSAGES/*.mo:
# translated program messages, read with the standard library), LAMBADA and transformers' sources,
# and seeded draws from the Unicode database of this Python.

KIND_BYTES = 400_000
CJK_LANGS = ["zh_CN", "zh_TW", "ja", "ko"]
OTHER_LANGS = ["ru", "uk", "bg", "el", "ar", "fa", "he", "hi", "th", "ka", "hy"]
CHAT_WORDS = (
    "great job see you tomorrow thanks so much lol that was amazing can't wait for the weekend "
    "happy birthday love this omg did you see the game last night good morning everyone "
    "congrats on the new job who is coming to the party I'm on my way be there in 5 haha"
).split()


def _cap(docs, limit):
    out, total = [], 0
    for doc in docs:
        if total >= limit:
            break
        out.append(doc)
        total += len(doc.encode())
    return out


def catalog_docs(langs, limit=KIND_BYTES, lines_per_doc=30):
    """Translated messages of the gettext catalogs of ``langs``, ~limit/len(langs) bytes per language."""
    docs = []
    for lang in langs:
        mine = []
        for path in sorted(glob.glob(f"/usr/share/locale/{lang}/LC_MESSAGES/*.mo")):
            try:
                with open(path, "rb") as f:
                    catalog = gettext.GNUTranslations(f)._catalog
            except (OSError, ValueError, UnicodeDecodeError):
                continue
            pairs = sorted(catalog.items(), key=lambda kv: str(kv[0]))
            lines = [v for k, v in pairs if k and isinstance(v, str) and v]
            mine += ["\n".join(lines[i : i + lines_per_doc]) for i in range(0, len(lines), lines_per_doc)]
        docs += _cap(mine, limit // len(langs))
    if not docs:
        raise SystemExit(f"no gettext catalogs for {langs} under /usr/share/locale")
    return docs


def english_docs(limit=KIND_BYTES):
    """Two LAMBADA texts, then one of transformers' .py sources (500 B-20 KB), in turn, in a fixed order."""
    data = importlib.resources.files("rwkv_hf.evaluation").joinpath("lambada_test.jsonl").read_text("utf-8")
    prose = [json.loads(line)["text"] for line in data.splitlines() if line.strip()]
    import transformers

    paths = sorted(Path(transformers.__file__).parent.rglob("*.py"))[:400]
    code = [p.read_text("utf-8", errors="replace") for p in paths]
    code = [c for c in code if 500 < len(c) < 20_000]
    mixed = [doc for pair in zip(prose[::2], prose[1::2], code) for doc in pair]
    return _cap(mixed, limit)


def _emoji():
    return [chr(c) for c in range(0x1F300, 0x1FAFF) if unicodedata.category(chr(c)) == "So"]


def chat_docs(limit=KIND_BYTES, seed=0):
    """Chat logs: 20 lines of 3-12 words and 1-4 emoji each (seeded)."""
    rnd, emoji, docs, total = random.Random(seed), _emoji(), [], 0
    while total < limit:
        lines = []
        for _ in range(20):
            words = " ".join(rnd.choice(CHAT_WORDS) for _ in range(rnd.randint(3, 12)))
            marks = "".join(rnd.choice(emoji) for _ in range(rnd.randint(1, 4)))
            cut = rnd.randint(0, len(words))
            lines.append(f"user{rnd.randint(1, 50)}: {words[:cut]} {marks} {words[cut:]}".strip())
        docs.append("\n".join(lines))
        total += len(docs[-1].encode())
    return docs


def random_code_point_docs(limit=KIND_BYTES, seed=0):
    """Seeded draws of assigned code points above U+07FF (symbols, rare scripts), with some spaces."""
    rnd, docs, total = random.Random(seed), [], 0
    while total < limit:
        chars = []
        while len(chars) < 600:
            c = chr(rnd.randrange(0x800, 0x110000))
            if unicodedata.category(c) not in ("Cn", "Cs", "Co"):
                chars.append(c if rnd.random() > 0.1 else " ")
        docs.append("".join(chars))
        total += len(docs[-1].encode())
    return docs


KINDS = [
    ("English prose and code", english_docs),
    ("Chinese/Japanese/Korean prose", lambda: catalog_docs(CJK_LANGS)),
    ("other scripts", lambda: catalog_docs(OTHER_LANGS)),
    ("chat lines with a few emoji each", chat_docs),
    ("random code points (symbols, rare scripts)", random_code_point_docs),
]


def timed(fn, repeat):
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def timed_cpu(fn, repeat):
    """Best wall-clock and best process CPU seconds over ``repeat`` runs, and the last output."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeat):
        c0, t0 = time.process_time(), time.perf_counter()
        out = fn()
        best, best_cpu = min(best, time.perf_counter() - t0), min(best_cpu, time.process_time() - c0)
    return best, best_cpu, out


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
    ap.add_argument("--kinds-repeat", type=int, default=5, help="best of N for every row of the kinds table")
    ap.add_argument("--only", choices=["mixed", "kinds", "cost"], help="print only that table")
    args = ap.parse_args()

    import tokenizers
    import torch
    import transformers
    import rwkv
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    print(f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), {cpu_model()}")
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__},"
        f" tokenizers {tokenizers.__version__}\n"
    )
    ref = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    if args.only == "cost":
        cost_table(args.kinds_repeat, ref)
        return
    if args.only != "kinds":
        mixed_table(args, ref)
    if args.only != "mixed":
        kinds_table(args.kinds_repeat, ref)


def cost_table(repeat, ref):
    """Microseconds of process CPU time per token, one document at a time, per kind of text."""
    from rwkv_hf.tokenization import RwkvWorldTokenizerFast

    fast = RwkvWorldTokenizerFast()
    backend = fast.backend_tokenizer
    print(f"load average {' '.join(open('/proc/loadavg').read().split()[:3])}; CPU affinity {sorted(os.sched_getaffinity(0))}")
    print(f"microseconds of CPU per token, one document at a time, best of {repeat}\n")
    print("| text | tokens/doc | reference | encode_batch_fast | encode_batch | __call__ | __call__ offsets | x ref |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, make in KINDS:
        docs = make()
        expected = [ref.encode(d) for d in docs]
        ntok = sum(map(len, expected))
        runs = {
            "reference": lambda: [ref.encode(d) for d in docs],
            "encode_batch_fast": lambda: [backend.encode_batch_fast([d])[0].ids for d in docs],
            "encode_batch": lambda: [backend.encode_batch([d])[0].ids for d in docs],
            "__call__": lambda: [fast(d)["input_ids"] for d in docs],
            "__call__ offsets": lambda: [fast(d, return_offsets_mapping=True)["input_ids"] for d in docs],
        }
        best = dict.fromkeys(runs, float("inf"))
        for _ in range(repeat):  # in turns, so that load from other processes hits every variant alike
            for key, fn in runs.items():
                c0 = time.process_time()
                out = fn()
                best[key] = min(best[key], time.process_time() - c0)
                if out != expected:
                    raise SystemExit(f"{key} differs from the reference on {name}")
        us = {k: v * 1e6 / ntok for k, v in best.items()}
        print(
            f"| {name} | {ntok / len(docs):.0f} | "
            + " | ".join(f"{v:.3f}" for v in us.values())
            + f" | {us['reference'] / us['__call__']:.2f} |",
            flush=True,
        )


def kinds_table(repeat, ref):
    """One row per kind of text: reference, fast __call__ one document at a time, and batched; all best of
    ``repeat`` (load from other processes only ever adds time), with process CPU time beside."""
    from rwkv_hf.tokenization import RwkvWorldTokenizerFast

    fast = RwkvWorldTokenizerFast()
    print(f"kinds of text: best of {repeat} wall-clock seconds per row (CPU seconds of the process in brackets)\n")
    print("| text | documents | MB | tokens | reference s | fast s | x ref | batched s | x ref | exact |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, make in KINDS:
        docs = make()
        nbytes = sum(len(d.encode()) for d in docs)
        t_ref, cpu_ref, expected = timed_cpu(lambda: [ref.encode(d) for d in docs], repeat)
        t_one, cpu_one, one = timed_cpu(lambda: [fast(d)["input_ids"] for d in docs], repeat)
        t_all, cpu_all, batch = timed_cpu(lambda: fast(docs)["input_ids"], repeat)
        exact = one == expected and batch == expected
        print(
            f"| {name} | {len(docs)} | {nbytes / 1e6:.2f} | {sum(map(len, expected))} | {t_ref:.3f} ({cpu_ref:.3f}) |"
            f" {t_one:.3f} ({cpu_one:.3f}) | {t_ref / t_one:.2f} | {t_all:.3f} ({cpu_all:.3f}) | {t_ref / t_all:.2f} |"
            f" {'yes' if exact else 'NO'} |",
            flush=True,
        )


def mixed_table(args, ref):
    from rwkv_hf.tokenization import RwkvWorldTokenizer, RwkvWorldTokenizerFast

    docs = corpus()
    nbytes = sum(len(d.encode()) for d in docs)
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

    print(f"corpus: {len(docs)} documents, {nbytes / 1e6:.2f} MB UTF-8, {ntok} tokens\n")
    print("| tokenizer | mode | seconds | MB/s | Mtokens/s | x reference | exact |")
    print("|---|---|---:|---:|---:|---:|---|")
    for name, mode, t, exact in rows:
        mb = nbytes / 1e6 / t
        print(
            f"| {name} | {mode} | {t:.2f} | {mb:.2f} | {ntok / 1e6 / t:.3f} | {t_ref / t:.2f} |"
            f" {'n/a' if exact is None else ('yes' if exact else 'NO')} |"
        )
    print()


if __name__ == "__main__":
    main()
