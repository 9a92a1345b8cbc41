"""`evolora export`: a trained run as a folder that transformers and PEFT load without evolora.

    <out>/
        evolora_export.json        what the folder holds: method, stage, task, base model, how to prompt
        tokenizer files            the run's tokenizer, with the semantic-ID tokens of next-item runs
        items.json                 item id -> title (CTR prompts) or semantic ID (next-item)
        item_stages.json           next-item runs with `task.candidates: seen`: item id -> the stage it first
                                   appears in (a row of stage s ranks the items of stages <= s; an item
                                   not listed is never ranked)
        item_vectors.safetensors   with task.retrieve_from: `vectors` [n_items, d], rows in the order of
        item_vectors.json          this list of item ids (what a prompt's history is retrieved by)
        adapter/                   one plain PEFT LoRA (adapter_config.json, adapter_model.safetensors);
                                   or long/ and short/ for LSAT's ensemble, mixed by the weight in
                                   evolora_export.json
        adapter/new_embeddings.safetensors
                                   rows of the added tokens: `input_embeddings` and `output_embeddings`
                                   [n_new, hidden], for token ids n_base.. (vLLM's LoRA format for an extra
                                   vocabulary; PEFT's own `trainable_tokens_delta` keys are not used)
        README.md                  how to load it: code that runs with transformers and PEFT alone

The manifest's `prompt` says how to rebuild a sample's prompt: the template, what fills each field, the
history's length (and retrieval), the text cached apart and how it is tokenized, the answer's tokens.

Every strategy says how it is one plain LoRA (`Strategy.plain_adapters`): a cumulative strategy's frozen
past updates and its current adapter are concatenated into one adapter of rank (k + 1) r, LSAT-TA's fused
adapter is written as it is; LSAT-EN stays two adapters and a weight; RecLoRA (an adapter per sample) has
`export-user-adapter` instead. `merge=True` writes the base model with the adapter and the token rows
merged in: a plain transformers model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evolora.api import Recommender
from evolora.bundle import run_config
from evolora.continual.base import PlainLora
from evolora.errors import EvoloraError
from evolora.io import atomic_directory, check_replaceable
from evolora.locks import sole_writer
from evolora.models.llm import LoraLM
from evolora.models.weights import base_to_load, cached_copy, load_pretrained
from evolora.queries import locate_run

log = logging.getLogger("evolora")


def export_run(
    run_dir: str | Path,
    out: str | Path,
    method: str | None = None,
    seed: int | None = None,
    stage: int | None = None,
    merge: bool = False,
    version: int | None = None,
    model: str | Path | None = None,
) -> Path:
    """Write the model of `method` after `stage` (or a deployed run's `version`; default: the promoted
    version, else the last stage) into `out` (replaced atomically); returns `out`. `model`: where the run's
    base model lies now, if not at its `model.name` (`Recommender.load`)."""
    out = check_replaceable(out, "evolora_export.json", "export")  # before the minutes of loading
    _, root = locate_run(Path(run_dir), method, seed)
    base_model = str(model) if model is not None else run_config(root).model.name
    base_folder = Path(base_model).expanduser().resolve()
    if base_folder.is_dir() and (out.resolve() == base_folder or out.resolve() in base_folder.parents):
        raise EvoloraError(
            f"--out {out} holds the run's base model ({base_model}), which an export replaces whole: choose "
            "another --out"
        )
    rec = Recommender.load(run_dir, method=method, seed=seed, stage=stage, version=version, model=model)
    try:
        strategy = rec.strategy
        lm = strategy.lm
        if not isinstance(lm, LoraLM):
            raise EvoloraError(
                f"{rec.method} is a conventional model ({rec.cfg.model.name}); export is for LLM runs: use "
                f"its adapter folder {rec.seed_dir}/stage-{rec.stage}/trained/adapters/default"
            )
        adapters = strategy.plain_adapters()
        info = strategy.export_info()
        if merge and len(adapters) > 1:
            raise EvoloraError(
                f"{rec.method} is an ensemble of {len(adapters)} adapters: export it without --merge"
            )
        # One export to a folder at a time; what a killed one left beside it goes first.
        with sole_writer(out, f"export to {out}") as removed:
            if removed:
                log.info("%s: removed the copies an earlier export, killed, left beside it", out)
            with atomic_directory(out) as folder:
                lm.tokenizer.save_pretrained(folder)
                task = rec.strategy.task
                items = task.export_item_map(rec._titles)
                (folder / "items.json").write_text(json.dumps(items, indent=1, ensure_ascii=False))
                stages = task.export_item_stages()
                if stages is not None:
                    (folder / "item_stages.json").write_text(json.dumps(stages, ensure_ascii=False))
                base = BaseWeights.of(rec.cfg.model.name, rec.cfg.model.revision)
                if merge:
                    _write_merged(lm, base, adapters["default"], folder)
                else:
                    for name, plain in adapters.items():
                        sub = folder / ("adapter" if len(adapters) == 1 else name)
                        _write_adapter(lm, base, plain, sub)
                manifest = _manifest(rec, adapters, info, merge, base)
                vectors = task.export_item_vectors()
                if vectors is not None:
                    _write_item_vectors(vectors, folder)
                (folder / "evolora_export.json").write_text(json.dumps(manifest, indent=2))
                readme = _readme(rec, out, merge, adapters, bool(lm.new_token_ids), base)
                (folder / "README.md").write_text(readme)
        log.info("exported %s (stage %d) to %s", rec.method, rec.stage, out)
        return out
    finally:
        rec.strategy.teardown()


# ------------------------------------------------------------------------------------------ writing
@dataclass(frozen=True)
class BaseWeights:
    """The base model an export builds on: what to load (`load`: a hub id or a folder) and at which
    `revision`; `converted`: the load is evolora's copy converted from the default model's GGUF, whose
    weights the run used and which are close to but not the hub's."""

    name: str
    revision: str | None
    load: str
    converted: bool

    @classmethod
    def of(cls, name: str, revision: str | None) -> BaseWeights:
        load, at = base_to_load(name, revision)
        return cls(name, at, load, cached_copy(name, revision) is not None)

    def code(self) -> str:
        """The arguments of `from_pretrained` that load it."""
        return repr(self.load) + (f", revision={self.revision!r}" if self.revision else "")

    def provenance(self) -> str:
        """What a README says of converted weights (no full stop: a README goes on after it); "" else."""
        if not self.converted:
            return ""
        return (
            f" Its base weights are evolora's copy of {self.name}, converted from the model's GGUF file"
            f" (`{self.load}`): close to, not the same as, the hub's"
        )


def _token_rows(lm: LoraLM, adapter: str) -> dict[str, torch.Tensor] | None:
    """The added tokens' rows of one adapter: input embeddings, and output ones (the same when tied)."""
    if not lm.new_token_ids:
        return None
    rows: dict[str, torch.Tensor] = {}
    for layer in lm.token_layers():
        which = (
            "input_embeddings" if isinstance(layer.base_layer, torch.nn.Embedding) else "output_embeddings"
        )
        rows.setdefault(which, layer.trainable_tokens_delta[adapter].detach().float().cpu().clone())
    rows.setdefault("output_embeddings", rows["input_embeddings"])  # tied output layer: the same rows
    return {k: v.contiguous().clone() for k, v in rows.items()}


def _write_adapter(lm: LoraLM, base: BaseWeights, plain: PlainLora, folder: Path) -> None:
    from peft import LoraConfig as PeftLoraConfig
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    rank = plain.rank
    config = PeftLoraConfig(
        r=rank,
        lora_alpha=plain.scaling * rank,  # PEFT scales by alpha / r: the factors' own scaling
        target_modules=sorted(lm.lora.target_modules),
        lora_dropout=0.0,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base.load,
        revision=base.revision,
    ).to_dict()
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, default=list))
    state = {}
    for name, (a, b) in plain.factors.items():
        state[f"{name}.lora_A.weight"] = a.float().contiguous().clone()
        state[f"{name}.lora_B.weight"] = b.float().contiguous().clone()
    save_file(state, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    rows = _token_rows(lm, plain.tokens_from)
    if rows is not None:
        save_file(rows, str(folder / "new_embeddings.safetensors"), metadata={"format": "pt"})


def _write_merged(lm: LoraLM, weights: BaseWeights, plain: PlainLora, folder: Path) -> None:
    """A fresh copy of the base model (the run's weights, at its revision) with the adapter's update added
    to its weights and the added tokens' rows in its embeddings."""
    base, _ = load_pretrained(weights.name, torch.float32, weights.revision)
    base.resize_token_embeddings(len(lm.tokenizer), mean_resizing=False)
    modules = dict(base.named_modules())
    with torch.no_grad():
        for name, (a, b) in plain.factors.items():
            target = modules[name.removeprefix("base_model.model.")]
            target.weight += (plain.scaling * b.float() @ a.float()).to(target.weight.dtype)
        rows = _token_rows(lm, plain.tokens_from)
        if rows is not None and lm.new_token_ids:
            ids = torch.tensor(lm.new_token_ids)
            base.get_input_embeddings().weight[ids] = rows["input_embeddings"]
            out_layer = base.get_output_embeddings()
            if out_layer is not None and out_layer.weight is not base.get_input_embeddings().weight:
                out_layer.weight[ids] = rows["output_embeddings"]
    base.save_pretrained(folder)


def _write_item_vectors(vectors: dict[str, Any], folder: Path) -> None:
    """What `task.retrieve_from` picks a prompt's history by: one row per item of item_vectors.json."""
    from safetensors.torch import save_file

    ids = list(vectors)
    stacked = torch.tensor(np.stack([np.asarray(vectors[i], dtype=np.float32) for i in ids]))
    save_file({"vectors": stacked}, str(folder / "item_vectors.safetensors"), metadata={"format": "pt"})
    (folder / "item_vectors.json").write_text(json.dumps(ids, ensure_ascii=False))


def _manifest(
    rec: Recommender, adapters: dict[str, PlainLora], info: dict, merge: bool, base: BaseWeights
) -> dict[str, Any]:
    task = rec.strategy.task
    manifest: dict[str, Any] = {
        "method": rec.method,
        "strategy": rec.strategy.name,
        "seed": rec.seed,
        "stage": rec.stage,
        "version": rec.version,  # a deployed run's version (0: the run as `evolora run` left it)
        "task": rec.task_name,
        # what the run trained and scored in; the README loads fp32 (a bf16 run's scores then differ ~1e-4)
        "precision": rec.precision,
        "base_model": rec.cfg.model.name,
        "base_revision": base.revision,
        "base_weights": base.load,  # the folder or hub id the run's base weights load from
        "merged": merge,
        "adapters": {name: {"rank": p.rank, "scaling": p.scaling} for name, p in adapters.items()},
        **info,
    }
    lm = rec.strategy.lm
    if lm.new_token_ids:
        manifest["new_tokens"] = {"count": len(lm.new_token_ids), "first_id": min(lm.new_token_ids)}
    manifest["prompt"] = task.prompt_recipe()
    if rec.task_name == "ctr":
        manifest["prompt"]["like_threshold"] = rec.like_threshold
    return manifest


def _readme(
    rec: Recommender,
    out: Path,
    merge: bool,
    adapters: dict[str, PlainLora],
    new_tokens: bool,
    base: BaseWeights,
) -> str:
    """How to load the folder with transformers and PEFT alone (tests run this code)."""
    head = f"# {rec.method}, after stage {rec.stage} ({rec.task_name})\n\n"
    head += f"Exported by evolora from `{rec.seed_dir.resolve()}`."
    prompting = (
        "How to prompt it: `evolora_export.json` (`prompt`: template, fields, tokenizing, answer) and "
        "`items.json`."
    )
    folder = repr(str(out.resolve()))  # a Python literal whatever the path holds

    def inside(*parts: str) -> str:
        return " / ".join(["folder", *map(repr, parts)])

    if merge:
        return (
            f"{head} A merged model, loaded with transformers alone:\n\n```python\nimport torch\n"
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
            f"folder = {folder}  # this folder\n"
            "tok = AutoTokenizer.from_pretrained(folder)\n"
            "model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)\n"
            f"```\n\n{prompting}\n"
        )
    if base.converted:
        head += (
            f"{base.provenance()}, so the code loads that folder; export with `--merge` for a folder that "
            "carries the weights."
        )
    names = list(adapters) if len(adapters) > 1 else ["adapter"]
    lines = [
        "from pathlib import Path",
        "",
        "import torch",
        "from peft import PeftModel",
        *(["from safetensors.torch import load_file"] if new_tokens else []),
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f"folder = Path({folder})  # this folder",
        "tok = AutoTokenizer.from_pretrained(folder)",
        f"model = AutoModelForCausalLM.from_pretrained({base.code()}, dtype=torch.float32)",
        "model.resize_token_embeddings(len(tok), mean_resizing=False)",
    ]
    rows = {name: inside(name, "new_embeddings.safetensors") for name in names}
    if new_tokens:  # the added tokens' trained rows (each adapter of several has its own: see `use`)
        lines += [
            "",
            "def load_token_rows(file):",
            "    new = load_file(file)",
            '    n = new["input_embeddings"].shape[0]',
            "    with torch.no_grad():",
            '        model.get_input_embeddings().weight[-n:] = new["input_embeddings"]',
            '        model.get_output_embeddings().weight[-n:] = new["output_embeddings"]',
            "",
            f"load_token_rows({rows[names[0]]})",
        ]
    if len(names) == 1:
        lines.append(f"model = PeftModel.from_pretrained(model, {inside('adapter')})")
    else:
        lines.append(
            f"model = PeftModel.from_pretrained(model, {inside(names[0])}, adapter_name={names[0]!r})"
        )
        lines += [f"model.load_adapter({inside(name)}, adapter_name={name!r})" for name in names[1:]]
        if new_tokens:
            rows_literal = ", ".join(f"{name!r}: {rows[name]}" for name in names)
            lines += [
                "",
                "def use(name):  # an adapter with its own added-token rows",
                f"    load_token_rows({{{rows_literal}}}[name])",
                "    model.set_adapter(name)",
            ]
        prompting += (
            f" {len(names)} adapters: score with each (`"
            + ("use(name)" if new_tokens else "model.set_adapter(name)")
            + "`) and mix the outputs with the weights of `ensemble` in evolora_export.json"
            + (", `use` loading each adapter's own added-token rows." if new_tokens else ".")
        )
    code = "\n".join(lines)
    return f"{head} Load it with transformers and PEFT alone:\n\n```python\n{code}\n```\n\n{prompting}\n"
