"""Tasks: how a sample becomes tokens, a loss, predictions and metrics. The built-in ones are registered
here (`registry.py`); another task registers itself the same way."""

from evolora.config import CtrTaskConfig, NextItemTaskConfig
from evolora.eval.metrics import CTR_METRICS, RANKING_METRICS
from evolora.tasks.conventional import build_conventional_ctr, build_conventional_next_item
from evolora.tasks.ctr import build_ctr
from evolora.tasks.next_item import build_next_item
from evolora.tasks.registry import TASKS, TaskSpec, register_task, task_spec

register_task(TaskSpec("ctr", CtrTaskConfig, CTR_METRICS, build_ctr, build_conventional_ctr))
register_task(
    TaskSpec(
        "next_item",
        NextItemTaskConfig,
        RANKING_METRICS,
        build_next_item,
        build_conventional_next_item,
        scores_given=False,
        score_name="log p(item | history)",
        score_column="log p",
    )
)

__all__ = ["TASKS", "TaskSpec", "register_task", "task_spec"]
