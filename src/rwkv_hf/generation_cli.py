"""What `rwkv-hf generate` and `rwkv-hf chat` do, as plain functions (the CLI only parses and prints).

- `load_model`: a folder or Hub id through AutoTokenizer / AutoModelForCausalLM.
- `generate_texts`: several prompts as one left-padded batch, World chat template unless `raw`.
- `ChatSession`: a conversation that keeps the recurrent state between turns. Each turn passes the
  cache returned by the previous `generate()` back in, together with the *whole* conversation's ids;
  the model's `prepare_inputs_for_generation` feeds only the columns the cache has not consumed, so
  the history is never read twice.
"""

from __future__ import annotations

from typing import Iterable, List, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TURN_END = "\n\n"  # the World chat format ends every message with a blank line


def _cache_field() -> str:
    """transformers >= 5.2x names the generate()/output cache `cache`; older versions `past_key_values`."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    return "cache" if "cache" in GenerateDecoderOnlyOutput.__dataclass_fields__ else "past_key_values"


def pick_device(device: Optional[str] = None) -> str:
    if device and device != "auto":
        return device
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(model: str, device: Optional[str] = None, dtype: Optional[str] = None, trust_remote_code: bool = False):
    """(tokenizer, model) for a converted folder or Hub id. dtype: fp32/bf16/fp16, default fp32 on CPU, bf16 on CUDA."""
    import rwkv_hf  # noqa: F401  registers our classes with the Auto* factories
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = pick_device(device)
    if dtype is None or dtype == "auto":
        dtype = "fp32" if device == "cpu" else "bf16"
    tokenizer = AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    return tokenizer, lm.to(device).eval()


def format_prompt(tokenizer, text: str, raw: bool = False, system: Optional[str] = None) -> str:
    if raw:
        return text
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class StopOnText(StoppingCriteria):
    """Stop a row once its generated text contains `stop` (the World chat turn end)."""

    def __init__(self, tokenizer, prompt_len: int, stop: str = TURN_END):
        self.tokenizer, self.prompt_len, self.stop = tokenizer, prompt_len, stop

    def __call__(self, input_ids, scores, **kwargs):
        done = [self.stop in self.tokenizer.decode(row[self.prompt_len :].tolist()) for row in input_ids]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


def sampling_kwargs(temperature: float = 1.0, top_p: float = 0.3, top_k: int = 0, max_new_tokens: int = 200) -> dict:
    """generate() kwargs; temperature 0 means greedy."""
    if temperature <= 0:
        return dict(do_sample=False, max_new_tokens=max_new_tokens, temperature=None, top_p=None, top_k=None)
    return dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k, max_new_tokens=max_new_tokens)


def _clean(text: str, raw: bool) -> str:
    return text if raw else text.split(TURN_END)[0].strip()


def generate_ids(model, tokenizer, texts: Sequence[str], stop: Optional[str] = None, streamer=None, **gen) -> List[List[int]]:
    """Token ids generated for each text, the texts run as one left-padded batch."""
    tokenizer.padding_side = "left"
    batch = tokenizer(list(texts), return_tensors="pt", padding=True).to(model.device)
    prompt_len = batch["input_ids"].shape[1]
    criteria = StoppingCriteriaList([StopOnText(tokenizer, prompt_len, stop)]) if stop else None
    with torch.no_grad():
        out = model.generate(
            **batch, pad_token_id=0, eos_token_id=0, stopping_criteria=criteria, streamer=streamer, **gen
        )
    rows = []
    for row in out[:, prompt_len:].tolist():
        if 0 in row:  # eos (or the padding after a finished row)
            row = row[: row.index(0)]
        rows.append(row)
    return rows


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    raw: bool = False,
    seed: Optional[int] = None,
    stream: bool = False,
    system: Optional[str] = None,
    **sampling,
) -> List[str]:
    """Complete every prompt (one batch). With `stream` and a single prompt, print tokens as they come."""
    from transformers import TextStreamer, set_seed

    if seed is not None:
        set_seed(seed)
    texts = [format_prompt(tokenizer, p, raw, system) for p in prompts]
    streamer = TextStreamer(tokenizer, skip_prompt=True) if stream and len(prompts) == 1 else None
    rows = generate_ids(model, tokenizer, texts, stop=None if raw else TURN_END, streamer=streamer, **sampling_kwargs(**sampling))
    return [_clean(tokenizer.decode(r), raw) for r in rows]


class ChatSession:
    """A World-format conversation. With `keep_state` (the default) each turn feeds only its new
    tokens into the state kept from the previous turn; without it every turn re-reads the history."""

    def __init__(self, model, tokenizer, keep_state: bool = True, system: Optional[str] = None, **sampling):
        self.model, self.tokenizer, self.keep_state = model, tokenizer, keep_state
        self.gen = sampling_kwargs(**sampling)
        self.ids: List[int] = []
        self.cache = None
        if system:
            self.ids = self._encode(tokenizer.apply_chat_template([{"role": "system", "content": system}], tokenize=False))

    def _encode(self, text: str) -> List[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @property
    def tokens_read(self) -> int:
        """How many conversation tokens the kept state has consumed."""
        return self.cache.get_seq_length() if self.cache is not None else 0

    def say(self, message: str, streamer=None) -> str:
        turn = self.tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True, tokenize=False)
        ids = self.ids + self._encode(turn)
        input_ids = torch.tensor([ids], device=self.model.device)
        prompt_len = len(ids)
        with torch.no_grad():
            out = self.model.generate(
                input_ids=input_ids,
                attention_mask=torch.ones_like(input_ids),
                **{_cache_field(): self.cache if self.keep_state else None},
                return_dict_in_generate=True,
                use_cache=True,
                pad_token_id=0,
                eos_token_id=0,
                stopping_criteria=StoppingCriteriaList([StopOnText(self.tokenizer, prompt_len)]),
                streamer=streamer,
                **self.gen,
            )
        new = out.sequences[0, prompt_len:].tolist()
        if new and new[-1] == 0:  # eos: the last token was never fed to the state, so it can be dropped
            new = new[:-1]
        text = self.tokenizer.decode(new)
        # close the turn the way the template does, so the next turn starts on a clean boundary
        if not text.endswith(TURN_END):
            new = new + self._encode("\n" if text.endswith("\n") else TURN_END)
        self.ids = ids + new
        self.cache = getattr(out, _cache_field()) if self.keep_state else None
        return text.split(TURN_END)[0].strip()


def chat_loop(session: ChatSession, read=input, write=print, stream: bool = True) -> None:
    """Read a line, answer it, until EOF or an empty line / `/exit`. `/reset` forgets the conversation."""
    from transformers import TextStreamer

    while True:
        try:
            line = read("User: ")
        except (EOFError, KeyboardInterrupt):
            write("")
            return
        if line.strip() in ("", "/exit", "/quit"):
            return
        if line.strip() == "/reset":
            session.ids, session.cache = [], None
            write("(conversation reset)")
            continue
        if stream:
            write("Assistant:", end="", flush=True)
            session.say(line, streamer=TextStreamer(session.tokenizer, skip_prompt=True))
        else:
            write("Assistant: " + session.say(line))


__all__ = ["ChatSession", "chat_loop", "format_prompt", "generate_ids", "generate_texts", "load_model", "sampling_kwargs"]
