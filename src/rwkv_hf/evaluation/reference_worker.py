"""Runs BlinkDL's `rwkv` package for `rwkv_hf.evaluation.reference`: a standalone script, one process.

Usage: python reference_worker.py SPEC.json   (run by path, so it never imports rwkv_hf)

SPEC: {"mode": "lambada" | "ppl", "ckpt": "x.pth", "threads": n, "strategy": "cpu fp32",
       "docs": [[context, target], ...]}            # lambada
       "text_file": path, "chunk": n}              # ppl
Everything is tokenised here with the package's own World tokenizer (TRIE_TOKENIZER), so this side
shares no code with ours. Results stream to stdout as JSON lines, one per document (lambada) or
one per chunk (ppl), then {"done": true, "wall_s": ...}. RWKV_V7_ON must be set by the caller.
"""

import json
import os
import sys
import time

import torch


RESULTS = None  # the original stdout, kept for results only (the package prints its own chatter)


def emit(obj):
    RESULTS.write(json.dumps(obj) + "\n")
    RESULTS.flush()


def score(out, dst, offset):
    """Log-probs and argmaxes of dst from the full-output logits rows offset .. offset+len(dst)-1."""
    logp = torch.log_softmax(out[offset : offset + len(dst)].float(), dim=-1)
    picked = [float(logp[j, t]) for j, t in enumerate(dst)]
    argmax = [int(a) for a in logp.argmax(dim=-1)]
    return picked, argmax


def main():
    global RESULTS
    t0 = time.perf_counter()
    RESULTS = os.fdopen(os.dup(1), "w", encoding="utf-8")
    sys.stdout.flush()
    os.dup2(2, 1)  # anything else written to stdout (by Python or C) goes to stderr
    sys.stdout = sys.stderr
    with open(sys.argv[1], encoding="utf-8") as f:
        spec = json.load(f)
    torch.set_num_threads(int(spec.get("threads") or 1))
    import rwkv
    from rwkv.model import RWKV
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    tokenizer = TRIE_TOKENIZER(os.path.join(os.path.dirname(rwkv.__file__), "rwkv_vocab_v20230424.txt"))
    ckpt = spec["ckpt"]
    kw = {} if os.environ.get("RWKV_V7_ON") == "1" else {"verbose": False}
    model = RWKV(model=ckpt[:-4] if ckpt.endswith(".pth") else ckpt, strategy=spec.get("strategy", "cpu fp32"), **kw)

    with torch.no_grad():
        if spec["mode"] == "lambada":
            for i, (context, target) in enumerate(spec["docs"]):
                src = [0] + tokenizer.encode(context)
                dst = tokenizer.encode(target)
                out, _ = model.forward(src + dst, None, full_output=True)
                picked, argmax = score(out, dst, len(src) - 1)
                emit({"i": i, "logprob": sum(picked), "correct": argmax == dst, "argmax": argmax})
        elif spec["mode"] == "ppl":
            with open(spec["text_file"], encoding="utf-8") as f:
                tokens = [0] + tokenizer.encode(f.read())
            chunk = int(spec["chunk"])
            state = None
            for start in range(0, len(tokens) - 1, chunk):
                piece = tokens[start : start + chunk]
                nxt = tokens[start + 1 : start + chunk + 1]
                out, state = model.forward(piece, state, full_output=True)
                if out.dim() == 1:
                    out = out.unsqueeze(0)
                picked, _ = score(out, nxt, 0)
                emit({"start": start, "n": len(picked), "logprob": sum(picked)})
        else:
            raise SystemExit(f"unknown mode {spec['mode']!r}")
    emit({"done": True, "wall_s": time.perf_counter() - t0})


if __name__ == "__main__":
    main()
