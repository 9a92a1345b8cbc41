"""Run configuration: one YAML file per experiment, validated on load.

A config has these sections (every key has a default, so `{}` is a valid config):

* `data`: which dataset and how to filter it;
* `staging`: how interactions are cut into stages D1..DT;
* `task`: how a sample becomes tokens and a score (`ctr`, `next_item`, or a registered task: its settings
  class derives from `TaskSection`, see `evolora.tasks.registry`);
* `model`: the LLM backbone and the LoRA shape, or a conventional recommender and its sizes;
* `train`: per-stage sample budgets and the optimiser;
* `eval`: evaluation sample size and batch size;
* `protocol`: which stage is evaluated after training on stage t;
* `strategies`: the continual strategies to run side by side (each with its own options);
* `seeds`: one run per (strategy, seed).

Unknown keys are errors (a typo should not silently fall back to a default). `--set a.b=value` overrides any
key from the command line; the value is parsed as YAML.

Past ~400 lines on purpose: every key a config may hold, with its default and its meaning, is in this one
file, the reference the README's configuration table summarises.
"""

from __future__ import annotations

import copy
import datetime
import difflib
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    SerializerFunctionWrapHandler,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_serializer,
    model_validator,
)

from evolora.errors import ConfigError


class NoBoolForNumbers(BaseModel):
    """Settings whose numbers refuse true/false (config sections, strategy options)."""

    @field_validator("*", mode="before")
    @classmethod
    def _no_true_for_a_number(cls, value: Any, info: ValidationInfo) -> Any:
        """true/false where a number is wanted is refused: pydantic's lax mode read `epochs: true` as 1."""
        given = value if isinstance(value, list) else [value]
        if any(isinstance(v, bool) for v in given) and not _admits_bool(
            cls.model_fields[info.field_name].annotation
        ):
            raise ValueError("a number, not true/false")
        return value


class Section(NoBoolForNumbers):
    # no inf or NaN in any number: lr=.inf passed gt=0 and trained nothing; min_gain=.nan never promoted
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)
    #: keys added after experiments were first recorded: left out of the dump while at their default, so an
    #: experiment recorded before a key existed keeps its key (`experiment.context_of`)
    added_keys: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _drop_added_keys_at_default(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        dumped = handler(self)
        for key in self.added_keys:
            if key in dumped and getattr(self, key) == type(self).model_fields[key].default:
                del dumped[key]
        return dumped


def _admits_bool(annotation: Any) -> bool:
    """Whether a field's type takes true/false anywhere in it (a flag, `bool | Literal[...]`, Any), or takes
    no number at all (other types refuse a bool on their own)."""
    parts, seen = [annotation], []
    while parts:
        part = parts.pop()
        if part is bool or part is Any:
            return True
        seen.append(part)
        parts.extend(typing.get_args(part))
    return not any(p in (int, float) for p in seen)


class KCore(Section):
    """Iteratively drop users with fewer than `user` and items with fewer than `item` interactions.

    Counted over the whole log, later stages included (as a k-cored dataset usually is): which users and
    items exist then depends on interactions a stage's model has not seen yet."""

    user: int = Field(0, ge=0)
    item: int = Field(0, ge=0)


class TableColumns(Section):
    """`data.format: table`: which column of the file holds what.

    `user`, `item` and `time` are required. The label comes from `rating` (rating > `data.like_threshold` is
    a like), or from `label` (0/1, or true/false), or, with neither, every row is a positive (implicit
    feedback: CTR samples then get `data.negatives` sampled negatives). `title`, `genre`, `category`,
    `description`, `year` and `sid` are item fields: read from `data.meta` (whose item id column is the
    `item` name) when it is given, else from the interaction file itself. `stage`: a column of whole numbers
    1..T giving each row's stage (the file's own stages: `staging.scheme: auto` uses them).
    """

    added_keys = ("stage",)
    user: str
    item: str
    time: str
    rating: str | None = None
    label: str | None = None
    title: str | None = None
    genre: str | None = None
    category: str | None = None
    description: str | None = None
    year: str | None = None
    sid: str | None = None
    stage: str | None = None

    ITEM_FIELDS: ClassVar[tuple[str, ...]] = ("title", "genre", "category", "description", "year", "sid")

    @model_validator(mode="after")
    def _check(self) -> TableColumns:
        if self.rating is not None and self.label is not None:
            raise ValueError(
                "map either rating (liked when rating > data.like_threshold) or label (0/1), not both"
            )
        names = [v for v in self.model_dump().values() if v is not None]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"each column may be mapped once; {repeated} is mapped more than once")
        return self

    def item_fields(self) -> dict[str, str]:
        """Our item field name -> the file's column name, for the mapped item fields."""
        return {f: c for f in self.ITEM_FIELDS if (c := getattr(self, f)) is not None}


# DataConfig keys that only mean something for `format: table`: left out of a dumped config at their
# defaults, so experiments recorded before these keys existed keep their key.
class DataConfig(Section):
    """Where the interactions come from.

    `source`: a registered dataset name (`ml-100k`, `ml-1m`; fetched and cached on first use) or a path to a
    file or folder. `format`: how to read `source` when it is a path (`auto` guesses from the file names;
    `table`, a team's own log as CSV/TSV/Parquet/JSONL, is never guessed and needs `columns`).
    """

    source: str = "ml-100k"
    format: Literal[
        "auto", "ml-100k", "ml-100k-atomic", "ml-1m", "amazon-2018", "amazon-2023", "peso", "table"
    ] = "auto"
    meta: str | None = Field(
        None,
        description="Amazon metadata file when `source` is the reviews file; for `table`, the items table",
    )
    kcore: KCore = KCore()
    like_threshold: float | None = Field(
        None,
        allow_inf_nan=False,
        description="rating > threshold is a like; default: the dataset's own (3 for 5-star data)",
    )
    max_interactions: int | None = Field(
        None, gt=0, description="keep only the most recent N interactions (before staging)"
    )
    min_rating: float | None = Field(
        None,
        allow_inf_nan=False,
        description="keep only interactions rated >= min_rating, first of the filters (RecBole's "
        "`val_interval: {rating: '[3,inf)'}` is 3); rows below it are counted in the log",
    )
    added_keys = ("columns", "time_unit", "separator", "negatives", "negative_seed", "min_rating")
    columns: TableColumns | None = Field(None, description="`format: table`: the file's column names")
    time_unit: Literal["s", "ms", "us", "ns"] = Field(
        "s", description="`format: table`: unit of numeric (epoch) times; ISO dates need none"
    )
    separator: str = Field(
        ",", description="`format: table`: the field separator of .csv files, e.g. ';' (.tsv files use tabs)"
    )
    negatives: int = Field(
        1,
        ge=0,
        description="implicit feedback: sampled negatives per positive sample of a task reading labels",
    )
    negative_seed: int = Field(0, ge=0, description="seed of the sampled negatives")

    @property
    def label_column(self) -> str | None:
        """The table's 0/1 label column (`columns.label`), None for other data: its ratings are labels."""
        return self.columns.label if self.format == "table" and self.columns is not None else None

    @model_validator(mode="after")
    def _check_table(self) -> DataConfig:
        if self.format == "table":
            if self.columns is None:
                raise ValueError(
                    "data.format: table needs data.columns, at least {user: ..., item: ..., time: ...} "
                    "naming the file's columns"
                )
            if self.min_rating is not None and self.columns.rating is None and self.columns.label is None:
                raise ValueError(
                    "data.min_rating: keeps interactions by their rating (or 0/1 label), and this table has "
                    "neither (data.columns.rating, data.columns.label)"
                )
            if self.like_threshold is not None and self.columns.rating is None:
                raise ValueError(
                    "data.like_threshold applies to a rating column (data.columns.rating); this table's "
                    + ("labels are 0/1" if self.columns.label else "rows are all positives (implicit)")
                )
            if len(self.separator) != 1 or self.separator in '"\r\n' or self.separator.isalnum():
                raise ValueError(
                    f"data.separator: {self.separator!r} is not one character that is no letter, digit, "
                    "quote or line break (e.g. ';' or '|')"
                )
        elif self.columns is not None or self.time_unit != "s" or self.separator != ",":
            raise ValueError(
                "data.columns, data.time_unit and data.separator apply to data.format: table only"
            )
        return self


def _utc_seconds(text: str) -> int:
    """An ISO date or date-time as epoch seconds; one without a zone is UTC."""
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"{text!r} is not an ISO date such as 2014-03-01 (or 2014-03-01T12:00)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=datetime.UTC)
    return int(when.timestamp())


class StagingConfig(Section):
    """How interactions are cut into stages by time.

    * `lsat`: the last `last_n` interactions (all when null) cut into `n_stages` periods of equal count
      (`by: count`) or equal length in time (`by: time`); earlier interactions stay as history only. With
      `by: time`, `window: [start, end]` (UTC dates) fixes the bins' span to [start, end) instead of the
      data's first to last interaction, as LSAT's Amazon-Book setup does (2014-03-01 to 2018-05-01, 20 bins):
      earlier interactions stay as history, later ones are left out (the log counts them).
    * `peso`: the first `base_fraction` of interactions is D1, the rest `n_stages - 1` equal-count blocks.
    * `global`: interactions cut once by time in `ratios` (default 8:1:1, RecLoRA's proportions), each part a
      stage; `n_stages` is `len(ratios)`. RecLoRA trains on the 80% and tests on the last 10%; here the parts
      are continual stages under `protocol`, and its cut is on interactions, not samples.
    * `preset`: the stages a dataset comes with (`data.format: peso`, or a table's `data.columns.stage`);
      `n_stages`, if set, must match them. The count comes from the data: use
      `evolora.data.num_stages_of` on the staged table.
    * `single`: one stage holding every interaction (the last `last_n`, if set): with `protocol:
      leave_last_out` the usual leave-one-out split by time (each user's last interaction the test, the one
      before it validation, the rest training: RecBole's `split: {LS: valid_and_test}, order: TO`), for
      holding models against figures published on that split. Not continual: one model, one evaluation.
    * `auto` (default): `preset` for a dataset that comes in stages, else `lsat` (a run records which).

    Interactions with the same timestamp always fall in the same stage, so no stage's training data shares
    a timestamp with a later stage's. Within a stage, the cut between training and validation pools and
    leave-last-out's last items follow time and then file order: tied timestamps may straddle them.
    """

    scheme: Literal["auto", "lsat", "peso", "global", "preset", "single"] = "auto"
    n_stages: int | None = Field(
        None, ge=2, description="default: 4 (lsat), 5 (peso), len(ratios) (global), the data's own (preset)"
    )
    last_n: int | None = Field(None, gt=0)
    by: Literal["count", "time"] = "count"
    base_fraction: float = Field(0.6, gt=0.0, lt=1.0)
    ratios: tuple[float, ...] = (0.8, 0.1, 0.1)
    added_keys = ("window",)
    window: tuple[str, str] | None = Field(
        None, description="lsat, by: time: the bins span [start, end), UTC dates such as '2014-03-01'"
    )

    @field_validator("window", mode="before")
    @classmethod
    def _dates_as_text(cls, v: Any) -> Any:
        # YAML reads an unquoted 2014-03-01 as a date: take it as the text it was
        if isinstance(v, list | tuple):
            return [d.isoformat() if isinstance(d, datetime.date) else d for d in v]
        return v

    def window_seconds(self) -> tuple[int, int] | None:
        """`window` as epoch seconds (a date without a zone is UTC)."""
        if self.window is None:
            return None
        return tuple(_utc_seconds(d) for d in self.window)  # type: ignore[return-value]

    @model_validator(mode="after")
    def _check(self) -> StagingConfig:
        if self.scheme == "single" and self.n_stages is not None:
            raise ValueError("staging.scheme=single makes one stage: drop staging.n_stages")
        if self.window is not None:
            if self.scheme not in ("lsat", "auto") or self.by != "time" or self.last_n is not None:
                raise ValueError(
                    "staging.window fixes the time bins of scheme lsat with by: time (and no last_n): "
                    f"here scheme {self.scheme}, by {self.by}, last_n {self.last_n}"
                )
            start, end = self.window_seconds()  # type: ignore[misc]
            if start >= end:
                raise ValueError(f"staging.window: {self.window[0]} is not before {self.window[1]}")
        if self.scheme == "global":
            if len(self.ratios) < 2 or any(r <= 0 for r in self.ratios):
                raise ValueError("staging.ratios needs at least two positive numbers")
            if self.n_stages is not None and self.n_stages != len(self.ratios):
                raise ValueError(
                    f"staging.n_stages={self.n_stages} but the global scheme has len(ratios)="
                    f"{len(self.ratios)} stages; drop n_stages or change ratios"
                )
        return self

    @property
    def num_stages(self) -> int:
        if self.scheme == "global":
            return len(self.ratios)
        if self.scheme == "single":
            return 1
        if self.n_stages is not None:
            return self.n_stages
        if self.scheme in ("preset", "auto"):
            raise ConfigError(
                "staging.scheme=preset takes its number of stages from the data: set staging.n_stages, or "
                "count them with evolora.data.num_stages_of(staged)"
            )
        return 5 if self.scheme == "peso" else 4


def _check_template(value: str, builtin: tuple[str, ...]) -> str:
    if value in builtin or Path(value).expanduser().is_file():
        return value
    raise ValueError(f"{value!r} is neither a built-in template {list(builtin)} nor an existing file")


class TaskSection(Section):
    """What every task's settings share: its `name` and how much history a sample keeps.

    Each task subclasses it with its own keys and registers the class (`register_task_config`, done by
    `evolora.tasks.registry.register_task`), so `task: {name: ...}` validates against that task's class.
    `reads_labels`: whether the task learns from sample labels (liked or not); only such tasks get sampled
    negatives on implicit-feedback data.
    """

    reads_labels: ClassVar[bool] = True
    added_keys = ("history_ties",)
    name: str
    history_len: int = Field(10, ge=1)
    min_history: int | None = Field(None, ge=0, description="default: history_len")
    sample_history: int | None = Field(None, ge=1, description="history kept per sample")
    history_ties: Literal["log_order", "exclude"] = Field(
        "log_order",
        description="interactions of the user at the target's very time: log_order counts those earlier in "
        "the log as before it (RecBole's and the papers' code's order; ML-100K rates many films in one "
        "second, Amazon's times are days); exclude keeps a history to strictly earlier times",
    )

    def history_kept(self) -> int:
        """How many earlier interactions a sample keeps (the prompt's and any longer reader's)."""
        return max(self.history_len, self.sample_history or 0)

    def min_history_or_default(self) -> int:
        return self.min_history if self.min_history is not None else self.history_len


#: task name -> its settings class (see `TaskSection`)
TASK_CONFIGS: dict[str, type[TaskSection]] = {}


def register_task_config(cls: type[TaskSection]) -> type[TaskSection]:
    """Make `task.name: <cls's name default>` validate against `cls`."""
    TASK_CONFIGS[cls.model_fields["name"].default] = cls
    return cls


class CtrTaskConfig(TaskSection):
    """TALLRec-style yes/no preference prediction.

    `history_len`: how many of the user's latest rated items go in the prompt (liked and disliked lists).
    `min_history`: targets with a shorter history are skipped (and counted). `template`: `tallrec` (the
    Alpaca prompt of TALLRec/LSAT), `compact` (the same fields without the Alpaca preamble: ~30% fewer
    tokens) or a path to a text file with `{preference}`, `{unpreference}`, `{target}` and `{item_kind}`
    fields. `loss`: `answer` (cross-entropy on the answer tokens only) or `prompt` (the whole sequence, as
    LSAT's and TALLRec's code train with `train_on_inputs=True`).
    """

    name: Literal["ctr"] = "ctr"
    retrieve_from: int | None = Field(
        None,
        ge=1,
        description="pick the history_len items most similar to the target (cosine of item embeddings) "
        "among the latest retrieve_from, kept in time order (ReLLa / RecLoRA's short text history); "
        "default: the latest history_len items",
    )
    template: str = "tallrec"
    builtin_templates: ClassVar[tuple[str, ...]] = ("tallrec", "compact")
    item_kind: str | None = Field(None, description="word used in the prompt; default from the dataset")
    loss: Literal["answer", "prompt"] = "answer"
    max_length: int = Field(512, ge=16, description="longer prompts lose their oldest history items")

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v, cls.builtin_templates)

    share_prefix: bool = Field(
        True,
        description="tokenize the template's fixed instruction apart and, on a CPU, run it once per batch "
        "and reuse its keys/values (same numbers in fp32, bf16 rounding apart under bf16-mixed; the tallrec "
        "template's ~65 of ~220 tokens, ~30% less "
        "compute; on a GPU it runs in every row, which is faster there: models.llm.splits_prefix; a "
        "tokenizer that reads the rest otherwise alone runs prompts whole: tasks.base.prefix_splits_cleanly)",
    )

    def history_kept(self) -> int:
        return max(super().history_kept(), self.retrieve_from or 0)


class SemanticIdConfig(Section):
    """Where items' semantic IDs come from.

    `source`: `dataset` uses the IDs shipped with the data (PESO's index); `rqvae` builds them: item text ->
    embeddings (`embedder`: the backbone's mean-pooled hidden states, or another HF model by id or path) ->
    residual quantisation with `levels` codebooks of `codebook_size` codes, trained on the items of stage 1
    only and then fixed (later items are encoded with it); where stage 1 has fewer items than
    `codebook_size`, it is fitted on every item's text, later stages' included, with a warning (lower
    `codebook_size` to keep it to stage 1). `auto`: `dataset` when the data has IDs.
    Colliding codes always get one more level that tells the items apart.
    """

    source: Literal["auto", "dataset", "rqvae"] = "auto"
    levels: int = Field(4, ge=1, le=8)
    codebook_size: int = Field(256, ge=2)
    epochs: int = Field(300, ge=1, description="RQ-VAE training epochs")
    embedder: str = "backbone"
    text_fields: tuple[str, ...] = ("title", "genre", "category", "description")
    seed: int = Field(0, ge=0)


#: the strings pydantic reads as a bool
_BOOL_WORDS = frozenset({"0", "off", "f", "false", "n", "no", "1", "on", "t", "true", "y", "yes"})


class NextItemTaskConfig(TaskSection):
    """Generative next-item recommendation: the history as semantic IDs in, the next item's ID out.

    `beams`: width of the constrained beam search (and the length of the ranked list). `constraint`: `trie`
    (only real items) or `levelwise` (PESO's: any token seen at that position). `exclude_history`: `true`
    never ranks an item of the prompt (the latest `history_len`), `rated` none the user rated before the row
    (stage 0 included: what a served recommendation leaves out, and how general recommenders are usually
    ranked, RecBole's full ranking of MF for one), `false` (PESO's) leaves every candidate in; conventional
    models leave out the same items. `logit_temperature`: PESO's code trains with
    logits / 0.8; 1.0 is plain cross-entropy. `candidates`: the items a row is ranked among: `catalogue`
    (every item with an ID, later stages' included: the LLM's default, its trie), `seen` (the items that
    appeared in the row's stage or earlier: the conventional models' default; an item whose first appearance
    is a test target of that stage counts, as RecBole's full ranking counts every item of the data); `auto`
    keeps each model's default, set one of the two to hold LLM and conventional rows against each other on
    one candidate set. `ties`: how a conventional model's full ranking orders items of equal score (cold
    items all score alike): `first`, the item that appeared first (older, so often more popular: a model
    scoring every item alike gets Hit@10 well above a random ranking's), or `random`, a fixed random order
    of the items (a seeded random key per item, so batches, reruns and later versions agree); the LLM's beam
    scores do not tie.
    """

    reads_labels: ClassVar[bool] = False  # it learns the next item itself: no sampled negatives
    added_keys = (*TaskSection.added_keys, "candidates", "ties")
    name: Literal["next_item"] = "next_item"
    history_len: int = Field(20, ge=1)
    min_history: int | None = Field(0, ge=0)
    sample_history: int | None = Field(None, ge=1, description="history kept per sample; default history_len")
    template: str = "peso"
    builtin_templates: ClassVar[tuple[str, ...]] = ("peso",)
    # At least the longest cut-off of the ranking metrics (Hit@10: eval.metrics.KS), checked here so a
    # narrower search is refused before the data is staged and the semantic IDs are trained.
    beams: int = Field(10, ge=10, description="beam search width; at least 10 (Hit@10 is reported)")
    constraint: Literal["trie", "levelwise"] = "trie"
    exclude_history: bool | Literal["rated"] = False
    logit_temperature: float = Field(1.0, gt=0)
    semantic_ids: SemanticIdConfig = SemanticIdConfig()
    candidates: Literal["auto", "catalogue", "seen"] = "auto"
    ties: Literal["first", "random"] = "first"

    @field_validator("template")
    @classmethod
    def _template(cls, v: str) -> str:
        return _check_template(v, cls.builtin_templates)

    @field_validator("exclude_history", mode="before")
    @classmethod
    def _exclude_history(cls, v: Any) -> Any:
        # one line naming the three values, rather than a failed bool and a failed literal
        if not isinstance(v, str) or v == "rated" or v.lower() in _BOOL_WORDS:
            return v
        raise ValueError(f"give true (the prompt's items), rated (every item rated before) or false: {v!r}")

    @model_validator(mode="after")
    def _exclusion_needs_the_trie(self) -> NextItemTaskConfig:
        # levelwise decoding does not know which token sequences are items, so it cannot leave any out
        if self.exclude_history and self.constraint == "levelwise":
            raise ValueError(
                "task.exclude_history leaves items out of the trie's search: it needs "
                "task.constraint: trie (levelwise decoding returned them; a run recorded with both before "
                "2026-12-05 has to be rerun)"
            )
        return self


register_task_config(CtrTaskConfig)
register_task_config(NextItemTaskConfig)


class LoraConfig(Section):
    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")


#: `model.name` values that select a conventional ID-based recommender instead of an LLM
CONVENTIONAL_MODELS = ("pop", "mf", "gru4rec", "sasrec", "two_tower", "din")


class ConventionalConfig(Section):
    """Settings of the conventional recommenders (`model.name`: pop, mf, gru4rec, sasrec, two_tower, din).

    LLM runs ignore this section (and it stays out of their experiment key). Sizes are CPU-friendly defaults.
    """

    dim: int = Field(64, ge=1, description="embedding and hidden size")
    layers: int | None = Field(
        None, ge=1, description="GRU layers (gru4rec) or self-attention blocks (sasrec); default 1 and 2"
    )
    heads: int = Field(2, ge=1, description="attention heads of sasrec (must divide dim)")
    dropout: float = Field(0.2, ge=0.0, lt=1.0)
    max_len: int = Field(
        50, ge=1, description="latest history items a model reads (at most the history a sample keeps)"
    )
    mlp: tuple[int, ...] = Field(
        (128, 64), description="hidden sizes of DIN's MLP; the last is the size of its user_representation"
    )
    activation: Literal["prelu", "relu"] = Field(
        "prelu", description="activation of DIN's MLP: prelu (the DIN paper's) or relu (RecLoRA's CRM)"
    )
    item_text: bool | None = Field(
        None, description="add hashed bag-of-words text features to item embeddings; default: two_tower only"
    )
    text_fields: tuple[str, ...] = Field(
        ("title", "genre", "category"), description="item table columns the text features read"
    )
    text_buckets: int = Field(16384, ge=16, description="hash buckets of the text features' word tokens")
    negatives: int = Field(4, ge=1, description="sampled negatives per positive of MF's BPR loss (next_item)")
    negatives_from: Literal["known", "unrated"] = Field(
        "known",
        description="where MF's BPR negatives are drawn: `known`, uniformly over the items known at the "
        "training stage (a draw may be an item the user rated); `unrated`, among those the user had not "
        "rated by the row (its earlier items and the target), as the BPR paper and RecBole draw them",
    )
    added_keys = ("activation", "negatives_from")

    @field_validator("mlp")
    @classmethod
    def _mlp(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if not v or any(h < 1 for h in v):
            raise ValueError("give at least one positive hidden size")
        return v


class ModelConfig(Section):
    """The backbone: an LLM (a hub id, a local folder, or `tiny` / `tiny-<family>`, a random model built in
    code for tests) or a conventional recommender (one of `CONVENTIONAL_MODELS`, set up by `conventional`).

    `precision`: `auto` is bf16 on a GPU, bf16-mixed on a CPU with native bf16 (AVX512-BF16 or AMX) and
    fp32 on other CPUs; `bf16-mixed` keeps fp32 weights and runs matrix products in bf16 (LoRA weights and
    the regularisers stay fp32). On CPUs without native bf16, bf16 is emulated and many times slower.
    `fp16` (CUDA GPUs without bf16) keeps fp16 weights under fp16 autocast, with loss scaling in training.
    `quantization` (CUDA and bitsandbytes): QLoRA, the frozen base in 4-bit NF4 or 8-bit, the adapters in
    fp32. Conventional models always run in fp32. `merge_lora`: passes without gradients (evaluation,
    validation, serving) run on the base weights with the LoRA update merged in, one product per projection
    instead of three: next-item beam search 1.03-1.06x faster on a CPU, CTR scoring no faster, scores equal
    up to fp32 rounding (`models/merged.py`); off by default so a table's figures reproduce to the digit.
    """

    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    revision: str | None = None
    precision: Literal["auto", "fp32", "bf16", "bf16-mixed", "fp16"] = "auto"
    device: str = Field("auto", description="auto, cpu, cuda, cuda:1, ...")
    added_keys = ("quantization", "merge_lora")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="QLoRA: load the frozen base in 4-bit NF4 or 8-bit (CUDA and bitsandbytes)"
    )
    merge_lora: bool = Field(
        False, description="evaluate with the LoRA update merged into fp32 base weights (faster decoding)"
    )
    lora: LoraConfig = LoraConfig()
    conventional: ConventionalConfig = ConventionalConfig()

    @model_validator(mode="after")
    def _check_quantization(self) -> ModelConfig:
        # Whether this machine can run fp16 or QLoRA is checked when a run starts
        # (`models.precision.check_machine`), not here: a GPU run's config must still load on a laptop.
        if self.quantization != "none" and self.name in CONVENTIONAL_MODELS:
            raise ValueError(f"model.quantization applies to LLM backbones, not to {self.name}")
        if self.merge_lora and self.name in CONVENTIONAL_MODELS:
            raise ValueError(f"model.merge_lora applies to LLM backbones with LoRA, not to {self.name}")
        if self.merge_lora and self.quantization != "none":
            raise ValueError("model.merge_lora needs unquantized base weights (it merges into fp32 ones)")
        return self


class TrainConfig(Section):
    """Per-stage training.

    `samples_per_stage`: training samples drawn (reproducibly, without replacement) from each stage's pool;
    a list gives one value per stage and its last value repeats; null uses the whole pool.
    `valid_samples`: the same for the validation pool. The best epoch by `select_by` on validation is kept;
    training stops after `patience` epochs without improvement. `grad_accum` micro-batches of `batch_size`
    make one optimiser step: the step of one batch of `batch_size` x `grad_accum` rows (the same rows, up to
    summation order; with `task.loss: prompt` each micro-batch's mean weighs by its rows, not its tokens).
    `gradient_checkpointing` recomputes the LLM's layer activations in the backward pass instead of keeping
    them: the same gradients without LoRA dropout, with far less activation memory, ~30% more compute.
    """

    samples_per_stage: int | list[int] | None = 256
    valid_samples: int | list[int] | None = 64
    epochs: int = Field(2, ge=1)
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-3, gt=0)
    lr_inherit: float | None = Field(
        None,
        gt=0,
        description="learning rate of jobs that continue an adapter from the previous stage "
        "(PESO uses 0.1 x lr); fresh adapters always use lr. Default: lr",
    )
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.0, ge=0, lt=1)
    schedule: Literal["constant", "linear", "cosine"] = "linear"
    max_grad_norm: float | None = Field(
        1.0, ge=0, description="clip the gradient's norm to this; 0 or null: no clipping"
    )
    group_by_length: bool = Field(
        True, description="batch training samples of similar length together (less padding), as TALLRec does"
    )
    select_by: Literal["auto", "metric", "loss", "last"] = Field(
        "auto",
        description="metric: the task's validation metric (AUC for ctr, NDCG@10 for next_item; where it is "
        "undefined on the validation rows, e.g. AUC on one label, the validation loss, since 2026-12-05: a "
        "shared job stored before kept its starting weights there, and is still reused); "
        "loss: validation loss; auto: metric for ctr and for conventional models, loss for LLM next_item "
        "(beam search every epoch is costly)",
    )
    patience: int | None = Field(None, ge=1)
    keep_start_if_better: bool = Field(
        False,
        description="score the starting adapter as epoch 0 and keep it when no epoch beats it "
        "(LSAT's code does this when fine-tuning)",
    )
    valid_fraction: float = Field(
        0.1,
        gt=0,
        lt=1,
        description="chronological tail of a stage used for validation (next_stage; leave_last_out validates "
        "on each user's second-to-last interaction)",
    )
    added_keys = ("gradient_checkpointing",)
    gradient_checkpointing: bool = Field(
        False, description="recompute layer activations in the backward pass (LLM backbones; less memory)"
    )

    @field_validator("samples_per_stage", "valid_samples")
    @classmethod
    def _positive(cls, v: int | list[int] | None) -> int | list[int] | None:
        values = v if isinstance(v, list) else [v] if v is not None else []
        if any(x <= 0 for x in values):
            raise ValueError("sample budgets must be positive (use null for the whole pool)")
        if isinstance(v, list) and not v:
            raise ValueError("an empty list is not a sample budget")
        return v

    def for_job(self, init: str) -> TrainConfig:
        """This config with the learning rate of a job that starts `fresh` or `inherit`s an adapter."""
        if init == "inherit" and self.lr_inherit is not None:
            return self.model_copy(update={"lr": self.lr_inherit})
        return self

    def budget(self, stage: int, valid: bool = False) -> int | None:
        """The sample budget of a 1-based stage."""
        v = self.valid_samples if valid else self.samples_per_stage
        if isinstance(v, list):
            return v[min(stage, len(v)) - 1]
        return v


class EvalConfig(Section):
    """Evaluation. `max_samples`: evaluate a fixed-seed random subset of each evaluated stage (null: all);
    the run record says when it did. It draws sample rows: on implicit data a sampled negative is drawn apart
    from its positive (`update.max_holdout` counts a positive with its negatives as one).

    `stages` (the stage-by-stage matrix R[t][j], `evolora/eval/forgetting.py`): `next` evaluates a model
    trained on stage t on the protocol's stage only (t+1 for next_stage, t for leave_last_out); `seen` also on
    the test rows of every earlier stage; `all` on every stage, later ones included (forward transfer needs
    them). Every strategy is judged on the same fixed-seed rows of each stage. Under next_stage a stage's
    test pool is the whole stage, so with `seen`/`all` each stage's evaluation rows are held out of its
    training and validation pools (no entry scores a row the model trained on; the training draws then
    differ from a `next` run's): set `max_samples` so that they are a small part of each stage. A held-out
    interaction still appears in the histories of its user's later rows (a CTR prompt lists it as liked or
    disliked), under either protocol; `hold_out_histories` also drops those rows from training and
    validation, so no held-out label reaches a model even as context (under leave_last_out since
    2026-12-05: before, the setting was ignored there).
    """

    max_samples: int | None = Field(None, gt=0)
    batch_size: int = Field(16, ge=1)
    seed: int = Field(0, ge=0)
    added_keys = ("stages", "hold_out_histories")
    stages: Literal["next", "seen", "all"] = "next"
    hold_out_histories: bool = Field(
        False,
        description="with stages seen/all: also drop training and validation rows whose history holds a "
        "held-out evaluation row's interaction",
    )


class UpdateConfig(Section):
    """`evolora update`: how a new batch of data becomes the next stage of a deployed run.

    The batch's chronological tail (`holdout_fraction`) is held out; the candidate (the promoted version
    trained on the rest) and the promoted version are both scored on it (on `max_holdout` of its samples,
    drawn with a fixed seed, when it has more; on implicit data each with its sampled negatives) with
    `metric` (default: the task's primary metric), and the candidate is promoted only when its gain is at
    least `min_gain` (negative: it may be worse by up to that margin; gains count in the metric's better
    direction).
    """

    holdout_fraction: float = Field(0.2, gt=0, lt=1)
    max_holdout: int | None = Field(
        400, gt=0, description="score a fixed-seed subset of this many held-out samples (null: all of them)"
    )
    min_gain: float = Field(
        -0.01, allow_inf_nan=False, description="promote when candidate - promoted >= min_gain"
    )
    metric: str | None = None
    lookalike_ids: Literal["refuse", "new"] = Field(
        "refuse",
        description="a batch whose new user or item ids are mostly the run's own written another way "
        "('1' for '001', another case): refuse it, or take them as new ids (each named in a warning)",
    )


def folder_name(value: str) -> str:
    """`value`, checked to be one folder name: an experiment's `name` and a strategy's label are path
    components of its run folders (and `--overwrite` deletes `output_dir/name`)."""
    if (
        not value.strip()
        or value in (".", "..")
        or any(c in value for c in "/\\\0")
        or any(ord(c) < 32 or ord(c) == 127 for c in value)  # a newline in a folder name breaks scripts
        or value.startswith((".", "_"))
    ):
        raise ValueError(
            f"{value!r} is not a folder name: one path component, without '/', '\\' or control "
            "characters, not starting with '.' or '_' (kept for evolora's own files, such as _shared)"
        )
    return value


class StrategySpec(Section):
    """One continual strategy: `name` plus that strategy's own options (checked by the strategy)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str
    label: str | None = Field(None, description="name in reports; default: the strategy name")

    @field_validator("label")
    @classmethod
    def _label_is_a_folder(cls, v: str | None) -> str | None:
        if v is not None and "|" in v:  # a label heads rows of report.md's tables, where '|' splits cells
            raise ValueError(f"{v!r}: a label cannot hold '|' (it names rows of the report's tables)")
        return v if v is None else folder_name(v)

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    @property
    def display(self) -> str:
        return self.label or self.name


class RunConfig(Section):
    name: str = "run"
    output_dir: str = "runs"
    data: DataConfig = DataConfig()
    staging: StagingConfig = StagingConfig()
    task: SerializeAsAny[TaskSection] = Field(default_factory=CtrTaskConfig)
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    update: UpdateConfig = UpdateConfig()
    protocol: Literal["next_stage", "leave_last_out"] = Field(
        "next_stage",
        description="next_stage: train on stage t, evaluate on t+1 (LSAT); "
        "leave_last_out: each active user's last interaction of stage t is its test (PESO)",
    )
    strategies: list[StrategySpec] = Field(default_factory=lambda: [StrategySpec(name="finetune")])
    seeds: list[Annotated[int, Field(ge=0)]] = Field(default_factory=lambda: [0])
    threads: int | None = Field(None, ge=1, description="torch CPU threads; default: all cores")
    tracking: Literal["none", "mlflow"] = Field(
        "none", description="mlflow: log runs, stages, epochs, adapters and update gates (evolora[mlflow])"
    )
    tracking_uri: str | None = Field(
        None,
        description="MLflow tracking URI; default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db",
    )

    @property
    def shared_root(self) -> Path:
        """Where results shared between the experiments of `output_dir` live (jobs, predictions, item
        IDs and embeddings)."""
        return Path(self.output_dir) / "_shared"

    @field_validator("task", mode="before")
    @classmethod
    def _task_of_its_kind(cls, v: Any) -> Any:
        if not isinstance(v, dict):
            return v
        v = {"name": "ctr", **v}
        kind = TASK_CONFIGS.get(v["name"])
        if kind is None:
            raise ValueError(f"unknown task {v['name']!r}; available: {', '.join(sorted(TASK_CONFIGS))}")
        return kind.model_validate(v)

    @field_validator("name")
    @classmethod
    def _name_is_a_folder(cls, v: str) -> str:
        if v.lower() in ("mlartifacts", "mlruns", "mlflow.db"):
            # MLflow keeps these beside the experiments in output_dir: --overwrite would delete them
            raise ValueError(
                f"{v!r} is where MLflow keeps every experiment's logs in output_dir: another name"
            )
        return folder_name(v)

    @field_validator("strategies", mode="before")
    @classmethod
    def _names_to_specs(cls, v: Any) -> Any:
        if isinstance(v, str):
            v = [v]
        if isinstance(v, list):
            return [{"name": s} if isinstance(s, str) else s for s in v]
        return v

    def label_of(self, spec: StrategySpec) -> str:
        """A strategy's name in results, reports and run folders: its `label`, else the strategy name,
        prefixed with the model for conventional models (`sasrec-finetune`), so they share tables with LLM
        runs."""
        if spec.label:
            return spec.label
        return f"{self.model.name}-{spec.name}" if self.model.name in CONVENTIONAL_MODELS else spec.name

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if not self.strategies:
            raise ValueError("strategies: give at least one")
        labels = [self.label_of(s) for s in self.strategies]  # folders: din's `finetune` is din-finetune
        dup = {x for x in labels if labels.count(x) > 1}
        if dup:
            raise ValueError(f"strategies: labels must be unique, repeated: {sorted(dup)} (set `label`)")
        if not self.seeds:
            raise ValueError("seeds: give at least one")
        if len(set(self.seeds)) < len(self.seeds):
            repeated = sorted({x for x in self.seeds if self.seeds.count(x) > 1})
            raise ValueError(f"seeds: each seed once (a seed repeated is the same run), repeated: {repeated}")
        if self.staging.scheme == "single" and self.protocol == "next_stage":
            raise ValueError(
                "protocol: next_stage tests on the stage after the last one trained, and staging.scheme "
                "single makes one stage: set protocol: leave_last_out (each user's last interaction is the "
                "test)"
            )
        return self


def _unknown_key(loc: tuple[Any, ...]) -> str:
    """What an unknown key's section takes (and the nearest spelling), or where every key is listed."""
    model = section_at(RunConfig, loc[:-1])
    # The task section's keys depend on task.name: the README lists them
    if model is None or "task" in loc[:-1]:
        return "unknown key (check the spelling; README.md's Configuration section lists every key)"
    near, keys = nearest_key(model, str(loc[-1]))
    where = f"{'.'.join(map(str, loc[:-1]))} takes" if len(loc) > 1 else "the config takes"
    return f"unknown key{f' (did you mean {near!r}?)' if near else ''}; {where}: {', '.join(keys)}"


def section_at(model: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    """The group of settings that the keys `path` name inside `model` (`model` for none); None where they
    name no one group."""
    for part in path:
        field = model.model_fields.get(part) if isinstance(part, str) else None
        inner = [a for a in _leaves(field.annotation) if _is_section(a)] if field is not None else []
        if len(inner) != 1:
            return None
        model = inner[0]
    return model


def nearest_key(section: type[BaseModel], key: str) -> tuple[str | None, list[str]]:
    """For a `key` that `section` does not take: its nearest spelling among the keys (None: none near),
    and every key, sorted."""
    keys = sorted(section.model_fields)
    near = difflib.get_close_matches(key, keys, n=1)
    return (near[0] if near else None), keys


def _leaves(annotation: Any) -> list[Any]:
    args = typing.get_args(annotation)
    return [leaf for a in args for leaf in _leaves(a)] if args else [annotation]


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _format_validation_error(err: ValidationError, where: str, origins: dict[str, str]) -> str:
    lines = [f"{where}: invalid configuration"]
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")  # pydantic's prefix to a validator's own message
        if e["type"] == "extra_forbidden":
            msg = _unknown_key(e["loc"])
        # A check across keys (a section's or the config's own validator) names its key first: "seeds: ..."
        named = re.match(r"([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)*): ", msg)
        if named and (not loc or named.group(1).startswith(f"{loc}.")):
            loc, msg = named.group(1), msg[named.end() :]
        loc = loc or "(top level)"
        # A value given on the command line is reported as the flag that gave it.
        given = next((o for k, o in origins.items() if loc == k or loc.startswith(f"{k}.")), None)
        value = e.get("input")
        if e["type"] == "string_type" and isinstance(value, bool | int | float | datetime.date):
            # YAML reads 2024-12-01 as a date, 2024 as a number, yes as true, where a text was meant
            kind = "true/false" if isinstance(value, bool) else "a number"
            kind = "a date" if isinstance(value, datetime.date) else kind
            # an element of a list (strategies.0.label) is no key --set takes: quote it where it stands
            keyed = all(isinstance(part, str) for part in e["loc"])
            where = f'{loc}: "..." or --set \'{loc}="..."\'' if keyed else '"..." in its list'
            msg += f" (YAML reads the value as {kind}: put it in quotes, {where})"
        lines.append(f"  {loc}: {msg}" + (f" (given by {given})" if given else ""))
    return "\n".join(lines)


def _given(text: str, flag: str) -> str:
    """How an error names an override: `--set 'a.b=1'` on the command line, `a.b=1` in Python (flag "")."""
    return f"{flag} {text!r}" if flag else repr(text)


def parse_override(text: str, flag: str = "--set") -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], parsed value); the value is read as YAML."""
    if "=" not in text:
        example = f"{flag} train.epochs=3" if flag else "train.epochs=3"
        raise ConfigError(f"{_given(text, flag)}: expected key=value, e.g. {example}")
    key, raw = text.split("=", 1)
    path = [p for p in key.strip().split(".") if p]
    if not path:
        raise ConfigError(f"{_given(text, flag)}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"{_given(text, flag)}: value is not valid YAML ({_yaml_problem(e)})") from None
    except Exception as e:  # a scalar YAML cannot build: 2024-13-01 (no such month), !!int abc, !!bool x
        raise ConfigError(f"{_given(text, flag)}: value cannot be read ({type(e).__name__}: {e})") from None
    return path, value


def _yaml_problem(e: yaml.YAMLError) -> str:
    """A parser error in one line: what was expected and at which character of the value."""
    problem = getattr(e, "problem", None)
    mark = getattr(e, "problem_mark", None)
    if problem is None:
        return str(e).splitlines()[0]
    return problem if mark is None else f"{problem} at character {mark.column + 1}"


def _yaml_file_problem(e: yaml.YAMLError) -> str:
    """A parser error of a file in one line: where (line and column), what, and what it was parsing."""
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem is None or mark is None:
        return " ".join(str(e).split())
    out = f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None:
        out += f" ({context} from line {start.line + 1}, column {start.column + 1})"
    return out


def _strategy_entry(entries: list[Any], name: str, text: str, flag: str) -> dict[str, Any]:
    """The strategy called `name` (its label, else its name; or its position) in a `strategies` list, as a
    mapping that an override can change (a bare name becomes `{name: ...}`)."""
    labels = [e.get("label") or e.get("name") if isinstance(e, dict) else e for e in entries]
    if name in labels:
        i = labels.index(name)
    elif name.isdigit() and int(name) < len(entries):
        i = int(name)
    else:
        raise ConfigError(f"{_given(text, flag)}: no strategy labelled {name!r} (the config has {labels})")
    if isinstance(entries[i], str):
        entries[i] = {"name": entries[i]}
    if not isinstance(entries[i], dict):
        raise ConfigError(f"{_given(text, flag)}: strategy {name!r} is not a mapping")
    return entries[i]


def apply_overrides(raw: dict[str, Any], overrides: list[str], flag: str = "--set") -> dict[str, Any]:
    """Apply `key=value` overrides in order. `strategies.<label>.<option>=value` sets one strategy's option
    (`<label>`: its label, else its name, or its position in the list)."""
    for text in overrides:
        path, value = parse_override(text, flag)
        node: Any = raw
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list) and path[i - 1 : i] == ["strategies"] and i == 1:
                node = _strategy_entry(node, part, text, flag)
                continue
            child = node.get(part)
            if part == "strategies" and i == 0 and not isinstance(child, dict):
                # A strategy's option: start from the list as the config (or the default) gives it.
                default = [
                    s.name
                    for s in RunConfig.model_fields["strategies"].get_default(call_default_factory=True)
                ]
                child = node[part] = [child] if isinstance(child, str) else child if child else default
            elif child is None:
                child = node[part] = {}
            if not isinstance(child, dict | list) or (isinstance(child, list) and part != "strategies"):
                raise ConfigError(f"{_given(text, flag)}: {part!r} is not a section")
            node = child
        if isinstance(node, list):
            raise ConfigError(
                f"{_given(text, flag)}: name a strategy and its option, e.g. strategies.peso.lam=50"
            )
        node[path[-1]] = value
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor`: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"{key!r} is given twice (lines {first[key]} and {line})",
                        key_node.start_mark,
                    )
                first[key] = line
            except TypeError:  # an unhashable key: the base loader names it
                break
        return super().construct_mapping(node, deep)


SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"  # the repository's configs/, installed too
QUICKSTART = SHIPPED_CONFIGS / "quickstart.yaml"


def shipped_config(path: str | Path) -> Path | None:
    """The config evolora ships under the name `path` (`forgetting-ctr-ml100k` or `...ml100k.yaml`), where
    `path` is a bare name (no folder, not even `./`) and nothing here has it, nor it with `.yaml` or `.yml`:
    the user's own file always wins. An installed evolora has no configs/ folder beside it."""
    text, p = str(path), Path(path)
    if "/" in text or "\\" in text or not p.name.strip(".") or _here(p) is not None:
        return None
    found = SHIPPED_CONFIGS / (p.name if p.suffix in (".yaml", ".yml") else f"{p.name}.yaml")
    return found if found.is_file() else None


def _here(p: Path) -> Path | None:
    """What the current folder holds under the name `p`, or it with a YAML suffix."""
    return next(
        (c for c in (p, p.with_name(f"{p.name}.yaml"), p.with_name(f"{p.name}.yml")) if c.exists()), None
    )


def _not_found_hint(path: Path) -> str:
    """What to give for a config file that is not there: a shipped config of its name, or their names."""
    names = sorted(f.stem for f in SHIPPED_CONFIGS.glob("*.yaml"))
    stem = path.name.removesuffix(".yaml").removesuffix(".yml")
    own = _here(path) if path.parent == Path(".") and path.name.strip(".") else None
    if own is not None and own != path:  # `name` given for the file ./name.yaml
        return f" (did you mean {own}?)"
    if stem in names and path.parent != Path("."):
        return f" (evolora ships a config of that name: give `{stem}` alone to run it)"
    return f" (evolora's shipped configs, given by name: {', '.join(names)})" if names else ""


def load_config(
    path: str | Path | None,
    overrides: list[str] | None = None,
    origins: dict[str, str] | None = None,
    flag: str = "--set",
) -> RunConfig:
    """Read and validate a YAML config; `None` gives the defaults. Raises `ConfigError` with every problem.

    `origins` maps a dotted key to the command-line flag that set it (e.g. `{"data.format": "--format"}`),
    so an invalid value is reported as that flag's; other overrides as `<flag> key=value`.
    """
    raw: dict[str, Any] = {}
    where = "defaults"
    if path is not None:
        where = str(path)
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"{path} is a folder; give a config file (YAML)")
        if not p.is_file():
            raise ConfigError(f"config file not found: {path}{_not_found_hint(p)}")
        try:
            loaded = yaml.load(p.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)  # a SafeLoader
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {_yaml_file_problem(e)}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(
                f"{path}: not UTF-8 text (byte {e.start}: {e.reason}); save it as UTF-8"
            ) from None
        except Exception as e:  # a scalar YAML cannot build: a date such as 2024-02-30, !!bool maybe
            raise ConfigError(f"{path}: a value cannot be read: {type(e).__name__}: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
        raw = loaded
    if path is None and overrides:
        where = "command line"
    return config_from_dict(raw, overrides, where, origins, flag)


def config_from_dict(
    raw: dict[str, Any],
    overrides: list[str] | None = None,
    where: str = "config",
    origins: dict[str, str] | None = None,
    flag: str = "--set",
) -> RunConfig:
    """Validate a config given as a mapping of sections, after `key=value` overrides; `ConfigError` names
    every problem under `where`, and an override's problem as `<flag> key=value` (`flag=""` for Python
    callers)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, not {type(raw).__name__}")
    raw = apply_overrides(copy.deepcopy(raw), overrides or [], flag)
    given = {o.split("=", 1)[0].strip(): f"{flag} {o}".strip() for o in overrides or [] if "=" in o}
    given.update(origins or {})
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_validation_error(e, where, given)) from None


def config_changes(old: dict, new: dict, prefix: str = "") -> str:
    """The settings that differ between two config dicts, as `key.sub: old -> new; ...`."""
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            sub = config_changes(a, b, f"{prefix}{k}.")
            if sub:
                out.append(sub)
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return "; ".join(out)


def definite_candidates(context: dict[str, Any]) -> dict[str, Any]:
    """A context with a next-item run's `task.candidates` made definite: `auto` (or absent) is the model's
    own default (the catalogue for an LLM, the items seen so far for a conventional model), so writing the
    default out changes no number and is the same experiment."""
    task = context.get("task", {})
    if task.get("name") != "next_item":
        return context
    own = "seen" if context.get("model", {}).get("name") in CONVENTIONAL_MODELS else "catalogue"
    given = task.get("candidates")
    return {**context, "task": {**task, "candidates": own if given in (None, "auto") else given}}


def config_to_dict(cfg: BaseModel) -> dict[str, Any]:
    return cfg.model_dump(mode="json")
