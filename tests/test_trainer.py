"""Epoch selection in `train_adapter` where the validation metric cannot judge the epochs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from evolora.config import CtrTaskConfig, TrainConfig
from evolora.models.llm import LoraLM
from evolora.tasks.ctr import CtrTask
from evolora.train.trainer import train_adapter
from tests.helpers import four_users_table, tiny_model


@pytest.fixture(scope="module")
def table():
    return four_users_table()


@pytest.mark.parametrize("keep_start", [False, True])
def test_an_undefined_validation_auc_chooses_epochs_by_the_validation_loss(table, keep_start: bool) -> None:
    """Validation rows of one label leave AUC undefined on every epoch: the job used to keep its starting
    weights without a word (no epoch's score beat "none"); the validation loss now judges the epochs."""
    lm = LoraLM.from_config(tiny_model(lora={"dropout": 0.0}))
    task = CtrTask(CtrTaskConfig(), table, {f"i{k}": f"Film {k}" for k in range(5)}, lm.tokenizer)
    labels = table.df["label"].to_numpy()
    valid = np.flatnonzero(labels == 0)[:3]
    train = np.setdiff1d(np.arange(len(table)), valid)
    assert len(valid) == 3 and set(labels[train]) == {0, 1}
    lm.activate("default", trainable=True)
    start = [p.detach().clone() for p in lm.trainable_parameters()]
    cfg = TrainConfig(epochs=2, batch_size=4, lr=0.05, select_by="metric", keep_start_if_better=keep_start)
    result = train_adapter(lm, task, lm.trainable_parameters(), train, valid, cfg, seed=0)
    losses = [h["valid_loss"] for h in result.history]
    assert all(np.isnan(h["valid_auc"]) for h in result.history)
    best = min(range(len(losses)), key=losses.__getitem__)
    assert result.best_epoch == result.history[best]["epoch"]
    assert result.best_value is None  # no AUC to report as the best one
    if result.best_epoch > 0:
        assert any(not torch.equal(a, p) for a, p in zip(start, lm.trainable_parameters(), strict=True))
    assert result.best_epoch > 0 or keep_start  # the training did lower the validation loss
