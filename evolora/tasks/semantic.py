"""The semantic IDs of a run's items: taken from the dataset or built by evolora, then cached.

Building them (`source: rqvae`): item text -> embedding (the backbone's mean-pooled hidden states, before any
adapter, or another HF model) -> an RQ-VAE trained on the items that appear in stage 1 only -> codes for
every item from that fixed quantizer -> one extra level where codes collide. Items of stage 1 come first, so
their IDs do not depend on which items arrive later: the vocabulary is fixed from D1 on, as a deployed
tokenizer would be.

IDs are cached under `<output_dir>/_shared/semantic_ids/`, keyed by everything they depend on, so every
strategy and every rerun of an experiment uses the same IDs.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, cast

import numpy as np
import polars as pl

from evolora import cost
from evolora.config import NextItemTaskConfig, RunConfig, SemanticIdConfig
from evolora.data.schema import InteractionData, item_fields
from evolora.errors import ConfigError, DataError
from evolora.io import load_npz, save_npz, stable_hash
from evolora.models.rqvae import assign_codes, train_rqvae
from evolora.models.semantic_ids import SemanticIds, embed_texts, make_unique

log = logging.getLogger("evolora.tasks")


def item_order(data: InteractionData, staged: pl.DataFrame) -> list[str]:
    """Items of stage 1 by first appearance, then later items by first appearance, then the rest."""
    early = staged.filter(pl.col("stage") <= 1)["item_id"].to_list()  # staged is in time order
    later = staged.filter(pl.col("stage") > 1)["item_id"].to_list()
    return list(dict.fromkeys([*early, *later, *data.items["item_id"].to_list()]))


def item_texts(data: InteractionData, items: list[str], fields: tuple[str, ...]) -> list[str]:
    """Each item's text: its `fields` joined, "item <id>" for an item with none of them filled."""
    table = data.items.select(["item_id", *item_fields(data.items, fields, "text_fields")])
    rows = {r["item_id"]: r for r in table.iter_rows(named=True)}
    texts = []
    for item in items:
        parts = [str(rows[item][f]) for f in fields if f in rows[item] and rows[item][f]]
        texts.append(". ".join(parts) or f"item {item}")
    return texts


def _embedder(cfg: SemanticIdConfig, pretrained: tuple[Any, Any]) -> tuple[Any, Any]:
    if cfg.embedder == "backbone":
        return pretrained
    from transformers import AutoModel, AutoTokenizer

    try:
        return AutoModel.from_pretrained(cfg.embedder), AutoTokenizer.from_pretrained(cfg.embedder)
    except OSError as e:
        raise ConfigError(f"task.semantic_ids.embedder={cfg.embedder!r} could not be loaded: {e}") from None


#: the item fields whose text the CTR task's history retrieval embeds
RETRIEVAL_FIELDS = ("title", "genre", "category")


def item_vectors_path(cfg: RunConfig, fields: tuple[str, ...] = RETRIEVAL_FIELDS) -> Path:
    """Where a run's item embeddings are cached (under `cfg.shared_root`), keyed by what they depend on."""
    key = stable_hash(
        {"data": cfg.data.model_dump(mode="json"), "model": cfg.model.name, "fields": fields}, 16
    )
    return cfg.shared_root / "item_vectors" / f"{key}.npz"


def item_vectors_for(
    cfg: RunConfig,
    data: InteractionData,
    pretrained: tuple[Any, Any],
    fields: tuple[str, ...] = RETRIEVAL_FIELDS,
) -> dict[str, np.ndarray]:
    """Unit-length text embeddings of every item (the backbone's mean-pooled hidden states), cached.

    Used by the CTR task's semantic history retrieval (ReLLa, RecLoRA), where cosine similarity to the
    target decides which history items the prompt shows.
    """
    path = item_vectors_path(cfg, fields)
    items = data.items["item_id"].to_list()
    stored = load_npz(path, "Delete it: the embeddings are computed again.") if path.is_file() else None
    if stored is not None and len(stored["vectors"]) == len(items):
        vectors = stored["vectors"]
    else:
        log.info("embedding %d item texts for history retrieval", len(items))
        with cost.part("item_embeddings"):
            vectors = embed_texts(*pretrained, item_texts(data, items, fields))
        vectors = vectors / np.linalg.norm(vectors, axis=1, keepdims=True).clip(1e-12)
        save_npz(path, {"vectors": vectors})
    return dict(zip(items, vectors, strict=True))


def _has_own_ids(data: InteractionData) -> bool:
    return "sid" in data.items.columns and data.items["sid"].null_count() < data.items.height


def semantic_ids_path(cfg: RunConfig, data: InteractionData) -> Path:
    """Where a run's semantic IDs are cached (under `cfg.shared_root`), keyed by what they depend on."""
    sid_cfg: SemanticIdConfig = cast(NextItemTaskConfig, cfg.task).semantic_ids
    source = sid_cfg.source if sid_cfg.source != "auto" else ("dataset" if _has_own_ids(data) else "rqvae")
    key = stable_hash(
        {"data": cfg.data.model_dump(mode="json"), "staging": cfg.staging.model_dump(mode="json"),
         "ids": sid_cfg.model_dump(mode="json"), "source": source,
         "model": cfg.model.name if sid_cfg.embedder == "backbone" else None},
        16,
    )  # fmt: skip
    return cfg.shared_root / "semantic_ids" / f"{key}.json"


def semantic_ids_for(
    cfg: RunConfig, data: InteractionData, staged: pl.DataFrame, pretrained: tuple[Any, Any]
) -> SemanticIds:
    """The run's semantic IDs (cached). `pretrained`: the backbone (model, tokenizer), without adapters."""
    sid_cfg: SemanticIdConfig = cast(NextItemTaskConfig, cfg.task).semantic_ids
    has_own = _has_own_ids(data)
    source = sid_cfg.source if sid_cfg.source != "auto" else ("dataset" if has_own else "rqvae")
    path = semantic_ids_path(cfg, data)
    if path.is_file():
        sids = SemanticIds.load(path)
        log.info("semantic IDs: %d items, %d levels (cached %s)", len(sids), sids.levels, path.name)
        return sids
    if source == "dataset":
        if not has_own:
            raise ConfigError("task.semantic_ids.source=dataset but this dataset ships no semantic IDs")
        with_sid = data.items.filter(pl.col("sid").is_not_null())
        try:
            raw = SemanticIds.from_strings(with_sid["item_id"].to_list(), with_sid["sid"].to_list())
        except ValueError as e:  # the data's own IDs: a problem of the file, named with its item
            raise DataError(
                f"{data.name}: the items' semantic IDs (data.columns.sid or the index): {e}"
            ) from None
        row = {item: i for i, item in enumerate(raw.item_ids)}
        order = [i for i in item_order(data, staged) if i in row]
        codes = raw.codes[[row[i] for i in order]]
        unique, stats = make_unique(codes)
        sids = SemanticIds(order, unique)
    else:
        order = item_order(data, staged)
        model, tok = _embedder(sid_cfg, pretrained)
        log.info("semantic IDs: embedding %d item texts", len(order))
        with cost.part("item_embeddings"):
            emb = embed_texts(model, tok, item_texts(data, order, sid_cfg.text_fields))
        first = set(staged.filter(pl.col("stage") <= 1)["item_id"].to_list())
        fit = np.array([i in first for i in order])
        if fit.sum() < sid_cfg.codebook_size:
            log.warning(
                "only %d stage-1 items to fit %d codes per level; the RQ-VAE fits all %d items instead",
                int(fit.sum()), sid_cfg.codebook_size, len(order),
            )  # fmt: skip
            fit[:] = True
        with cost.part("rqvae"):
            quantizer = train_rqvae(
                emb[fit], levels=sid_cfg.levels, codebook_size=sid_cfg.codebook_size, epochs=sid_cfg.epochs,
                seed=sid_cfg.seed,
            )  # fmt: skip
        unique, stats = make_unique(assign_codes(quantizer, emb))
        sids = SemanticIds(order, unique)
    log.info(
        "semantic IDs (%s): %d items, %d levels + 1 for %d collision groups (largest %d)",
        source, len(sids), unique.shape[1] - 1, stats.collision_groups, stats.max_group,
    )  # fmt: skip
    sids.save(path)
    return sids
