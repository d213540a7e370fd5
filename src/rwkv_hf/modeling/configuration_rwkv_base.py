"""What every RWKV World configuration shares: sizes, special tokens, and how to run the WKV."""

from typing import Optional

from transformers import PretrainedConfig


class RwkvWorldConfigBase(PretrainedConfig):
    """Sizes come from the checkpoint's tensor shapes (see `rwkv_hf.convert`), never from a size name.

    Args:
        vocab_size: rows of `emb.weight` (65536 for World models).
        hidden_size: the model width C (`n_embd`).
        num_hidden_layers: the number of blocks.
        intermediate_size: the channel-mix width (rows of `ffn.key.weight`).
        head_size: the WKV head size N (64 in every released v5-v7 model); heads = hidden_size / head_size.
        layer_norm_epsilon: eps of every LayerNorm (the reference uses torch's default, 1e-5).
        rescale_every: in fp16, the reference halves the residual after every this many layers and
            scales the output projections to match, to keep fp16 from overflowing. 0 disables it.
            It is applied on the fly, so the weights are never changed. (Not used by v7.)
        wkv_mode: "auto" (one token: recurrent; CUDA with flash-linear-attention: its kernels;
            otherwise the chunked form), or force "recurrent", "chunk" or "fla".
        prefill_segment: inputs longer than this many tokens run through the blocks in segments of
            this length, carrying the state, so that a very long prompt needs memory for one segment's
            activations, not the whole prompt's (0: never segment).
        cuda_graph_decode: on CUDA, one-token forward passes without gradients (every step of
            `generate()` after the prompt) replay a captured CUDA graph with the state in static
            buffers, instead of launching the step's few hundred small kernels one by one.
        compile_decode: whether decode steps run each block's step (`rwkv_decode`) compiled with
            torch.compile. None (the default): on CUDA, the step captured in the CUDA graph is
            compiled where Triton runs (a card of compute capability >= 7): about twice as fast as
            the eager graph (1.5B RWKV-7 on an H200: `generate()` 408 instead of 202 tok/s at batch 1),
            for a first call per batch size that compiles (7-16 s on an H200); never on CPU. True:
            also on CPU, instead of the plain step function CPU decoding uses anyway (needs a C++
            compiler; without one, a warning and the plain step). False: never. A
            `generate(..., disable_compile=True)` call never compiles, as with transformers' own
            automatic compilation. Not for v4-v6 in fp16. Fused kernels round differently from the
            eager ops: in bf16 the logits differ from the eager path's by bf16 noise (so greedy
            tokens can part from `cuda_graph_decode=False`'s); in fp32 they agree to ~1e-6.
        triton_decode: in wkv_mode "auto", the step captured in the CUDA graph runs `rwkv_triton`'s
            kernels, seven a layer (RWKV-7 eight from batch 8, RWKV-6 nine), instead of the eager or
            compiled step (no torch.compile; Triton builds its kernels once per machine and keeps them
            in its cache).
            None (the default): every version where Triton runs (not DeepEmbed RWKV-7, not v4-v6 in
            fp16), for batches of up to 32 rows (larger: the compiled step); True: also larger batches;
            False: never. Like the compiled step, it rounds differently from the eager ops in bf16;
            in fp32 it agrees to ~1e-6.
        fuse_cross_entropy: in training mode with `labels`, compute the loss together with the LM head
            in chunks of tokens (`rwkv_loss`), so that no [tokens, vocab] logits (and no fp32 copy or
            gradient of them) exist; `logits` is then None in the output. Off: the logits are
            computed and returned, and the loss taken from them (transformers' causal-LM loss).
    """

    keys_to_ignore_at_inference = ["cache", "past_key_values"]
    attribute_map = {"n_embd": "hidden_size", "n_layer": "num_hidden_layers"}

    def __init__(
        self,
        vocab_size: int = 65536,
        hidden_size: int = 768,
        num_hidden_layers: int = 12,
        intermediate_size: int = 3072,
        head_size: int = 64,
        layer_norm_epsilon: float = 1e-5,
        rescale_every: int = 6,
        wkv_mode: str = "auto",
        prefill_segment: int = 4096,
        cuda_graph_decode: bool = True,
        compile_decode: Optional[bool] = None,
        triton_decode: Optional[bool] = None,
        fuse_cross_entropy: bool = True,
        bos_token_id: int = 0,
        eos_token_id: int = 0,
        pad_token_id: int = 0,
        tie_word_embeddings: bool = False,
        use_cache: bool = True,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.intermediate_size = intermediate_size
        self.head_size = head_size
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rescale_every = rescale_every
        self.wkv_mode = wkv_mode
        if isinstance(prefill_segment, bool) or not isinstance(prefill_segment, int) or prefill_segment < 0:
            raise ValueError(f"prefill_segment must be a whole number of tokens >= 0 (0: never), got {prefill_segment!r}")
        self.prefill_segment = prefill_segment
        self.cuda_graph_decode = cuda_graph_decode
        self.compile_decode = compile_decode
        self.triton_decode = triton_decode
        self.fuse_cross_entropy = fuse_cross_entropy
        self.use_cache = use_cache
        super().__init__(
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            tie_word_embeddings=tie_word_embeddings,
            **kwargs,
        )

    @property
    def num_attention_heads(self) -> int:
        return self.hidden_size // self.head_size
