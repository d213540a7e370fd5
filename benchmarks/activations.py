"""What a training step keeps for its backward pass, counted: the bytes of every tensor autograd saves
(torch.autograd.graph.saved_tensors_hooks; each storage once; the weights not counted), sorted by the
code that saved it, for one block of a 1.5B-shaped model (width 2048, bf16) and for the LM head with
the loss. Device-independent: the same ops save the same tensors on the CPU and on CUDA, except the
WKV itself, whose saves belong to its form (here the chunked PyTorch form; on CUDA fla's kernels,
which keep their own), so they are reported apart.

    python benchmarks/activations.py [--versions 7 6 5.2 4] [--tokens 128]

Per token and layer, then scaled to issue 13's training run (4 x 2048 tokens, 24 layers) beside the
same with gradient checkpointing (`model.gradient_checkpointing_enable()`).
"""

from __future__ import annotations

import argparse
import collections
import traceback
import warnings

import torch

WKV_FILES = ("rwkv_ops.py", "rwkv_chunk.py", "rwkv7_chunk.py", "rwkv_fla.py")


def saved_bytes(model, ids, layer: str, checkpointing: bool) -> collections.Counter:
    """{(file:line, dtype): bytes} of the tensors saved for backward while `layer` (a module name) runs,
    plus "head" for those saved after the last block (the final norm, the LM head and the loss)."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen, out, where = set(), collections.Counter(), ["embedding"]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights and ptr not in seen and where[0] in (layer, "head"):
            seen.add(ptr)
            frame = [f for f in traceback.extract_stack() if "rwkv_hf" in f.filename][-1]
            name = frame.filename.rsplit("/", 1)[-1]
            key = "head" if where[0] == "head" else ("WKV form" if name in WKV_FILES else f"{name}:{frame.lineno}  {frame.line[:70]}")
            out[key] += t.untyped_storage().nbytes()
        return t

    hooks = [model.model.blocks[i].register_forward_pre_hook(lambda m, a, i=i: where.__setitem__(0, f"blocks.{i}"))
             for i in range(len(model.model.blocks))]
    hooks.append(model.model.ln_out.register_forward_pre_hook(lambda m, a: where.__setitem__(0, "head")))
    if checkpointing:
        model.gradient_checkpointing_enable()  # (transformers 5 also calls it activation_checkpointing_enable)
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(ids, labels=ids, wkv_mode="chunk")
    finally:
        for h in hooks:
            h.remove()
        if checkpointing:
            model.gradient_checkpointing_disable()
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--versions", nargs="+", default=["7", "6", "5.2", "4"])
    ap.add_argument("--tokens", type=int, default=128)
    args = ap.parse_args(argv)
    from rwkv_hf.testing import build_model, make_state_dict

    warnings.filterwarnings("ignore", category=FutureWarning)
    C, T, run_tokens, run_layers = 2048, args.tokens, 4 * 2048, 24
    print(f"width {C}, bf16, {T} tokens, layer 1 of 2 (layer 0 of RWKV-7 makes v_first); torch {torch.__version__}")
    for version in args.versions:
        model = build_model(make_state_dict(version, n_layer=2, n_embd=C, seed=0)).to(torch.bfloat16).train()
        ids = torch.randint(0, 65536, (1, T), generator=torch.Generator().manual_seed(0))
        plain = saved_bytes(model, ids, "blocks.1", False)
        ckpt = saved_bytes(model, ids, "blocks.1", True)
        per = lambda c, k=None: sum(v for key, v in c.items() if key != "head" and (k is None or (key == "WKV form") == k)) / T  # noqa: E731
        print(f"\nRWKV-{version}: bytes saved per token and layer (x C = {C}):")
        for key, v in sorted(plain.items(), key=lambda kv: -kv[1]):
            if key != "head":
                print(f"  {v / T / C:6.1f} x C  {key}")
        head = plain["head"] / T  # (with the loss's weight gradient, which does not grow with the tokens)
        gib = lambda b: b / 2**30  # noqa: E731
        for name, c in (("as is", plain), ("gradient checkpointing", ckpt)):
            block = per(c)
            print(f"  {name}: {block / C:.1f} x C a token and layer ({per(c, False) / C:.1f} outside the WKV form); "
                  f"issue 13's run ({run_tokens} tokens, {run_layers} layers): "
                  f"{gib(block * run_tokens * run_layers):.1f} GiB in the blocks")
        print(f"  after the last block (norm, head, loss; with the head's fp32 weight gradient): {gib(head * T):.2f} GiB")


if __name__ == "__main__":
    main()
