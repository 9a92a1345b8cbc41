"""Shared test helpers: a small learnable dataset in GroupLens ML-100K format and a tiny-model config."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from evolora.config import ModelConfig, RunConfig, load_config
from evolora.data.samples import SampleTable, build_samples

# The example log shipped in tests/data (a CSV of uid, iid, ts, stars; items with a name), read as a table.
EXAMPLE_DATA = Path(__file__).resolve().parent / "data"
EXAMPLE_COLUMNS = "{user: uid, item: iid, time: ts, rating: stars, title: name}"
EXAMPLE_TABLE = {
    "data.format": "table",
    "data.columns": EXAMPLE_COLUMNS,
    "data.meta": str(EXAMPLE_DATA / "example_items.csv"),
    "task.min_history": 1,
}


def split_example_log(folder: Path, at: float = 0.8) -> pl.DataFrame:
    """The example log cut by time: its first `at` as `folder`/base.csv (a run's data), the rest as
    `folder`/new.csv (an update's batch), which is returned."""
    log = pl.read_csv(EXAMPLE_DATA / "example_log.csv").sort("ts")
    cut = int(log.height * at)
    log[:cut].write_csv(folder / "base.csv")
    log[cut:].write_csv(folder / "new.csv")
    return log[cut:]


def free_port() -> int:
    """A local TCP port free at the time of asking (for a server or an accelerate rendezvous in a test)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


#: Every LoRA strategy of the suite (RecLoRA aside: it needs a CRM), with options that exercise its state.
LORA_STRATEGIES: list[dict[str, Any]] = [
    {"name": "frozen"},
    {"name": "finetune"},
    {"name": "retrain"},
    {"name": "peso", "lam": 5.0},
    {"name": "lsat", "long_stages": 1, "grid": [0.0, 0.5, 1.0]},
    {"name": "lsat", "label": "lsat-ta", "inference": "fusion", "grid": [0.0, 0.5, 1.0]},
    {"name": "sumlora", "init": "fresh"},
    {"name": "sdlora"},
    {"name": "inflora"},
    {"name": "olora", "lam": 0.5},
]


def staged_frame(rows: list[tuple[str, str, float, int, int]]) -> pl.DataFrame:
    """Interactions (user, item, rating, timestamp, stage) as the staged frame `build_samples` reads."""
    return pl.DataFrame(
        rows,
        schema={
            "user_id": pl.Utf8,
            "item_id": pl.Utf8,
            "rating": pl.Float64,
            "timestamp": pl.Int64,
            "stage": pl.Int32,
        },
        orient="row",
    ).sort("timestamp")


def four_users_table() -> SampleTable:
    """24 ratings of 4 users on 5 items in 2 stages, as samples of 3 history items (at least 2): a CTR table
    small enough to train a tiny model on in seconds."""
    rows = [
        (f"u{u}", f"i{(u + k) % 5}", float(1 + (u * 7 + k) % 5), 100 * k + u, 1 if k < 4 else 2)
        for u in range(4)
        for k in range(6)
    ]
    return build_samples(staged_frame(rows), 2, 3.0, history_len=3, min_history=2)


def write_sunny_rainy(
    folder: Path, n_users: int = 40, per_user: int = 24, n_items: int = 60, seed: int = 0
) -> Path:
    """GroupLens `u.data`/`u.item` files where the target title decides the label.

    Even items are "Sunny ..." and (nearly always) rated 5, odd items "Rainy ..." and rated 1, so a model that
    reads the target title can reach a high AUC: a learnable signal for end-to-end tests. Users rate at
    interleaved times so every stage has many users.
    """
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    t0 = 880_000_000
    for u in range(1, n_users + 1):
        items = rng.choice(np.arange(1, n_items + 1), size=per_user, replace=False)
        times = np.sort(rng.choice(np.arange(0, 10_000_000, 60), size=per_user, replace=False)) + t0
        for i, t in zip(items, times, strict=True):
            sunny = i % 2 == 0
            rating = 5 if sunny else 1
            if rng.random() < 0.05:
                rating = 6 - rating
            lines.append(f"{u}\t{i}\t{rating}\t{t}\n")
    (folder / "u.data").write_text("".join(lines))
    genres = "|".join(["0"] * 19)
    items = []
    for i in range(1, n_items + 1):
        title = f"Sunny Day {i}" if i % 2 == 0 else f"Rainy Night {i}"
        items.append(f"{i}|{title} (1995)|01-Jan-1995||http://x/{i}|{genres}\n")
    (folder / "u.item").write_text("".join(items), encoding="latin-1")
    return folder


def save_tiny_model(folder: Path, seed: int) -> str:
    """The tiny model of `seed` saved as a model folder (weights and tokenizer); its weights' fingerprint."""
    from evolora.models.tiny import build_tiny
    from evolora.models.weights import weights_fingerprint

    model, tok = build_tiny(seed=seed)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return weights_fingerprint(model)


def tiny_model(**fields: Any) -> ModelConfig:
    """The tiny model's config, in fp32 whatever the CPU (pass `precision=` to test another)."""
    return ModelConfig(**{"name": "tiny", "precision": "fp32", **fields})


class Killed(BaseException):
    """A `kill -9`: nothing in evolora catches it."""


def kill_after_stage(results: dict) -> None:
    """`run_experiment(..., on_stage=kill_after_stage)`: the process dies once its first stage is recorded."""
    raise Killed


def tiny_config(data_dir: Path, out: Path, **overrides: Any) -> RunConfig:
    """A config that runs the whole loop with the tiny model in seconds, in fp32."""
    sets = {
        "name": "t",
        "output_dir": str(out),
        "data.source": str(data_dir),
        "staging.scheme": "lsat",
        "staging.n_stages": 3,
        "task.history_len": 5,
        "task.template": "compact",
        "model.name": "tiny",
        # Numbers compared by tests must not depend on the CPU (auto = bf16-mixed where bf16 is native).
        "model.precision": "fp32",
        "model.lora.target_modules": "[q_proj, k_proj, v_proj, o_proj]",
        "train.samples_per_stage": 48,
        "train.valid_samples": 24,
        "train.epochs": 2,
        "train.batch_size": 8,
        "train.lr": 0.01,
        "eval.max_samples": 40,
        "strategies": "[frozen, finetune]",
    }
    sets.update({k: str(v) for k, v in overrides.items()})
    return load_config(None, [f"{k}={v}" for k, v in sets.items()])


def write_peso_cycle(
    folder: Path, n_users: int = 24, n_items: int = 30, n_blocks: int = 3, seed: int = 0
) -> Path:
    """A PESO-format folder (blocks + index) where each user walks the items in a cycle: i -> i + 1.

    Item i has the two-level semantic ID <a_{i // 6}><b_{i % 6}>; no two items collide.
    """
    import json

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    key = "Cycle_cl_0.6_0_5_3_0"
    history: dict[str, list[str]] = {str(u): [] for u in range(n_users)}
    position = {str(u): int(rng.integers(n_items)) for u in range(n_users)}
    for b in range(n_blocks):
        block = {}
        for u in map(str, range(n_users)):
            if b > 0 and rng.random() < 0.3:
                continue  # not every user is active in every block
            n = int(rng.integers(5, 9))
            current = [str((position[u] + k) % n_items) for k in range(n)]
            position[u] = (position[u] + n) % n_items
            block[u] = {"previous_block": list(history[u]), "current_block": current}
            history[u] += current
        (folder / f"{key}.all.block_{b}.json").write_text(json.dumps(block))
    index = {str(i): [f"<a_{i // 6}>", f"<b_{i % 6}>"] for i in range(n_items)}
    (folder / f"{key}.index.epoch1_edim1_beta0.0.json").write_text(json.dumps(index))
    return folder


# The next-item task on `write_peso_cycle`'s folder: its blocks as stages, leave-last-out in each.
NEXT_ITEM_CYCLE = {
    "task.name": "next_item",
    "task.history_len": 8,
    "task.template": "peso",
    "protocol": "leave_last_out",
    "staging.scheme": "preset",
    "staging.n_stages": "null",
}


def write_arrivals(folder: Path, n_users: int = 30, n_items: int = 40, per_user: int = 12) -> Path:
    """ML-100K-format files where users arrive one after another and higher item ids become available later,
    so later stages bring new users and new items. Titles say "Sunny" (rated 5) or "Rainy" (rated 1)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for u in range(1, n_users + 1):
        pool = np.arange(1, min(n_items, 8 + u) + 1)
        items = rng.choice(pool, size=min(per_user, len(pool)), replace=False)
        start = 880_000_000 + u * 100_000
        times = start + np.sort(rng.choice(np.arange(0, 3_000_000, 60), size=len(items), replace=False))
        for i, t in zip(items, times, strict=True):
            lines.append(f"{u}\t{i}\t{5 if i % 2 == 0 else 1}\t{t}\n")
    (folder / "u.data").write_text("".join(lines))
    genres = "|".join(["0"] * 19)
    rows = [
        f"{i}|{'Sunny Day' if i % 2 == 0 else 'Rainy Night'} {i} (1995)|01-Jan-1995||http://x/{i}|{genres}\n"
        for i in range(1, n_items + 1)
    ]
    (folder / "u.item").write_text("".join(rows), encoding="latin-1")
    return folder


def keep_caches_as_before_2026_12_05(cfg: RunConfig) -> Path:
    """Lay out the next-item experiment `cfg` ran as an evolora before 2026-12-05 left it: its semantic IDs
    and their quantizer, in the cache and in its bundle, named by the settings' key, and no record of their
    names. Returns the IDs' file in the cache."""
    import json

    from evolora.data.loaders import load_dataset
    from evolora.tasks.semantic import quantizer_path, semantic_ids_path_by_settings

    root = Path(cfg.output_dir) / cfg.name
    bundle = root / "inference"
    for record in (root / "experiment.json", bundle / "bundle.json"):
        meta = json.loads(record.read_text())
        caches = meta.pop("caches")
        record.write_text(json.dumps(meta))
    inside = Path(caches["semantic_ids"]).relative_to("_shared")  # the bundle's record
    legacy = semantic_ids_path_by_settings(cfg, load_dataset(cfg.data))
    for shared in (cfg.shared_root, bundle / "_shared"):
        now, then = shared / inside, shared / legacy.relative_to(cfg.shared_root)
        now.rename(then)
        quantizer_path(now).rename(quantizer_path(then))
    return legacy


def sentencepiece_like_tokenizer() -> Any:
    """A BPE tokenizer that marks a word start ("▁") before every text it is given, as Llama-2's and
    Mistral's SentencePiece tokenizers do, trained in code on the tiny tokenizer's corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from evolora.models.tiny import _CORPUS

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
    chars = sorted(set("".join(_CORPUS)) | set('"?:.,\n()'))
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], initial_alphabet=chars,
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator([*_CORPUS, "Yes. No. " * 8] * 4, trainer=trainer)  # "▁Yes" and "▁No" merge
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
