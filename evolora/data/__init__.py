"""The data layer: load a source into `InteractionData`, filter it, and cut it into stages."""

from evolora.data.digest import data_digest
from evolora.data.fetch import fetch, registered_datasets
from evolora.data.filters import kcore, keep_recent
from evolora.data.formats.amazon import load_amazon_2018, load_amazon_2023
from evolora.data.formats.movielens import load_movielens_1m, load_movielens_100k, load_movielens_atomic
from evolora.data.formats.peso import load_peso_blocks
from evolora.data.formats.table import load_table
from evolora.data.loaders import detect_format, load_dataset
from evolora.data.schema import InteractionData
from evolora.data.staging import (
    assign_stages,
    num_stages_of,
    stage_global,
    stage_lsat,
    stage_peso,
    stage_preset,
    stage_table,
)

__all__ = [
    "InteractionData",
    "assign_stages",
    "data_digest",
    "detect_format",
    "fetch",
    "kcore",
    "keep_recent",
    "load_amazon_2018",
    "load_amazon_2023",
    "load_dataset",
    "load_movielens_1m",
    "load_movielens_100k",
    "load_movielens_atomic",
    "load_peso_blocks",
    "load_table",
    "num_stages_of",
    "registered_datasets",
    "stage_global",
    "stage_lsat",
    "stage_peso",
    "stage_preset",
    "stage_table",
]
