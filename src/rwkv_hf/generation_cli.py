"""What `rwkv-hf generate` and `rwkv-hf chat` do, as plain functions (the CLI only parses and prints).

- `load_model`: a folder or Hub id through AutoTokenizer / AutoModelForCausalLM, checked first
  (`check_model_source`): a folder must hold config.json and weights whose layer count is the
  config's (read from the safetensors headers, before a model is built); a Hub id fails at once when
  the Hub cannot be reached and the model is not cached; weights that do not fit the config refuse.
- `resolve_device`: a device name checked against this machine.
- `generate_texts`: several prompts as one left-padded batch, World chat template unless `raw`.
- `ChatSession`: a conversation that keeps the recurrent state between turns. Each turn passes the
  cache returned by the previous `generate()` back in, together with the *whole* conversation's ids;
  the model's `prepare_inputs_for_generation` feeds only the columns the cache has not consumed, so
  the history is never read twice.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from .modeling.rwkv_state import error_line

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


def resolve_device(device: Optional[str] = None) -> str:
    """`device` ("auto": cuda if available) checked against this machine: ValueError for a name torch
    does not know, or a device this machine does not have."""
    name = pick_device(device)
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {name!r}; expected cpu, cuda, cuda:N, mps, ...") from None
    if dev.type == "cpu":
        return name
    backend = getattr(torch, dev.type, None) if dev.type != "mps" else torch.backends.mps
    if backend is None or not hasattr(backend, "is_available") or not backend.is_available():
        raise ValueError(f"device {name!r} is not available on this machine (torch {torch.__version__}); use --device cpu")
    count = getattr(backend, "device_count", lambda: 1)()
    if dev.index is not None and dev.index >= count:
        raise ValueError(f"device {name!r} does not exist: this machine has {count} {dev.type} device(s)")
    return name


_SIZE_FIELDS = ("hidden_size", "vocab_size", "intermediate_size", "attention_hidden_size", "head_size", "num_attention_heads")
_LAYER_KEY = re.compile(r"(?:^|\.)(?:blocks|layers)\.(\d+)\.")


def check_model_folder(folder: Path) -> None:
    """A local model folder, checked before transformers builds anything from it: config.json is a
    JSON object, every safetensors file is whole, and the config's layer count is the weights'
    (so an edited or forged `num_hidden_layers` never allocates a model)."""
    from safetensors import SafetensorError, safe_open

    from .convert.blinkdl import CheckpointError
    from .convert.hf_folder import _folder_weight_files

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: not a model folder (no config.json)")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{config_path}: not valid JSON ({error_line(e)})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: not a JSON object")
    try:
        files = _folder_weight_files(folder)
    except CheckpointError as e:
        raise ValueError(str(e)) from None
    shapes = {}
    for f in files:
        if f.suffix != ".safetensors":
            return  # pickled weights: only transformers' loader reads them
        try:
            with safe_open(str(f), framework="pt") as h:
                shapes.update({k: h.get_slice(k).get_shape() for k in h.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{f}: damaged or truncated safetensors file ({error_line(e)})") from None
    blocks = {int(m.group(1)) for k in shapes if (m := _LAYER_KEY.search(k))}
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    if isinstance(layers, int) and blocks and layers != len(blocks):
        raise ValueError(f"{folder}: config.json says {layers} layers but the weights hold {len(blocks)}; the config does not match the weights")
    largest = max((d for shape in shapes.values() for d in shape), default=0)
    for name in _SIZE_FIELDS:  # a size no weight has would allocate a model larger than the files
        if isinstance(config.get(name), int) and shapes and config[name] > largest:
            raise ValueError(f"{folder}: config.json says {name}={config[name]} but no weight has a dimension that large; "
                             "the config does not match the weights")


def _hub_reachable(timeout: float = 5.0) -> bool:
    """Whether the Hugging Face Hub answers a TCP connection within `timeout` seconds (False when
    HF_HUB_OFFLINE is set), so a machine without network fails at once instead of retrying."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    result = []

    def connect():
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    t = threading.Thread(target=connect, daemon=True)
    t.start()
    t.join(timeout)  # name resolution has no timeout of its own
    return bool(result)


def check_model_source(model: str) -> bool:
    """Check a folder (`check_model_folder`) or a Hub id. Returns whether to load from the local
    cache only (the Hub is unreachable but the model is cached); ValueError otherwise."""
    path = Path(model).expanduser()
    if path.is_dir():
        check_model_folder(path)
        return False
    if path.exists():
        raise ValueError(f"{model} is a file; give a converted model folder (rwkv-hf convert makes one) or a Hub repo id")
    if model.startswith((".", "/", "~")) or model.count("/") != 1:
        raise ValueError(f"{model}: no such folder (and not a Hub repo id of the form owner/name)")
    if _hub_reachable():
        return False
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "config.json"), str):
        return True
    raise ValueError(f"{model}: not a local folder, and the Hugging Face Hub cannot be reached (no network or HF_HUB_OFFLINE) "
                     "and has not cached it")


def _load_tokenizer(model: str, **kwargs):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model, **kwargs)
    except (KeyError, TypeError, AttributeError) as e:  # tokenizer files that parse but hold the wrong things
        raise ValueError(f"{model}: its tokenizer files cannot be loaded ({type(e).__name__}: {error_line(e)})") from None
    except Exception as e:  # the `tokenizers` library raises a bare Exception for a tokenizer.json it cannot read
        if type(e) is not Exception:
            raise
        raise ValueError(f"{model}: its tokenizer.json cannot be read ({error_line(e)})") from None


def load_model(model: str, device: Optional[str] = None, dtype: Optional[str] = None, trust_remote_code: bool = False):
    """(tokenizer, model) for a converted folder or Hub id. dtype: fp32/bf16/fp16, default fp32 on CPU, bf16 on CUDA.
    Bad input (see `check_model_source`, `resolve_device`) raises ValueError with a one-line message."""
    import rwkv_hf  # noqa: F401  registers our classes with the Auto* factories
    from transformers import AutoModelForCausalLM

    from .modeling.rwkv_common import loading_problems

    device = resolve_device(device)
    if dtype is None or dtype == "auto":
        dtype = "fp32" if device == "cpu" else "bf16"
    local_only = check_model_source(model)
    tokenizer = _load_tokenizer(model, trust_remote_code=trust_remote_code, local_files_only=local_only)
    lm, info = AutoModelForCausalLM.from_pretrained(
        model, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, local_files_only=local_only,
        output_loading_info=True, ignore_mismatched_sizes=True,
    )
    problems = loading_problems(info)  # for every model class: ours raise this themselves
    if problems:
        raise ValueError(f"{model}: the weights do not match config.json: {'; '.join(problems)}")
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

    if raw and any(not p for p in prompts):
        raise ValueError("an empty prompt gives --raw nothing to continue; give some text")
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
