"""The task registry: one entry per task, everything the rest of evolora needs to know about it.

An entry (`TaskSpec`) holds the task's settings class (what `task: {name: ...}` validates against), how it
builds the LLM backbone and the task from the prepared data, optionally how it builds the task for a
conventional ID model, and its metrics (`eval.metrics.MetricSet`: names, primary metric, direction, and how
to compute each from stored predictions). `experiment.py`, `cli.py` and `eval/report.py` read it; a new task
is its file plus one `register_task` call.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from evolora.config import TaskSection, register_task_config
from evolora.errors import ConfigError
from evolora.eval.metrics import METRIC_SETS, MetricSet

if TYPE_CHECKING:
    from evolora.config import RunConfig
    from evolora.data.ids import IdSpace
    from evolora.data.prepare import Prepared
    from evolora.models.llm import LoraLM
    from evolora.tasks.base import Task

#: (config, prepared data, (pretrained model, tokenizer)) -> (backbone with its adapter, task)
LlmBuilder = Callable[["RunConfig", "Prepared", tuple[Any, Any]], tuple["LoraLM", "Task"]]
#: (config, prepared data, the ID space of users and items) -> the task for a conventional model
ConventionalBuilder = Callable[["RunConfig", "Prepared", "IdSpace"], "Task"]


@dataclass(frozen=True)
class TaskSpec:
    name: str
    config: type[TaskSection]
    metrics: MetricSet
    build: LlmBuilder
    build_conventional: ConventionalBuilder | None = None
    #: how a trained run answers (`Recommender`, `recommend`, the server): True, it scores the items it is
    #: given (`score`, candidates ranked by score); False, it generates its own top k
    scores_given: bool = True
    #: what its answers' scores are, in full (JSON answers) and as a table's column
    score_name: str = "P(like)"
    score_column: str = "P(like)"


TASKS: dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a task: its config validates, its metrics are known to reports."""
    if spec.config.model_fields["name"].default != spec.name:
        raise ValueError(f"task {spec.name!r}: its config's `name` defaults to something else")
    TASKS[spec.name] = spec
    register_task_config(spec.config)
    METRIC_SETS[spec.name] = spec.metrics
    return spec


def task_spec(name: str) -> TaskSpec:
    if name not in TASKS:
        raise ConfigError(f"task.name: unknown task {name!r}; available: {', '.join(sorted(TASKS))}")
    return TASKS[name]
