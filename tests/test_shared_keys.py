"""What a result shared between experiments of one output folder (`runs/_shared`) is keyed by: the contents
of the files an experiment reads, not their paths, and only the settings that change the job."""

from __future__ import annotations

from pathlib import Path

import pytest

from evolora.continual.shared import SharedStore
from evolora.errors import ConfigError
from evolora.experiment import run_experiment
from tests.helpers import save_tiny_model, tiny_config, write_sunny_rainy

ONE = {"strategies": "[finetune]", "train.epochs": 1}


def _first_job(result: dict) -> dict:
    return result["stages"][0]["jobs"][0]


def test_edited_data_or_template_under_the_same_path_is_trained_again(tmp_path: Path) -> None:
    """A second experiment in the folder reuses the first one's stage 1 on the same files; after the data
    file or the template file is edited in place (same path, same settings) it trains its own."""
    data = write_sunny_rainy(tmp_path / "data")
    template = tmp_path / "prompt.txt"
    template.write_text(
        "Liked: {preference}\nDisliked: {unpreference}\nWill the user like {target}?\nAnswer:",
        encoding="utf-8",
    )
    out = tmp_path / "runs"

    def run(name: str) -> dict:
        return run_experiment(tiny_config(data, out, name=name, **ONE, **{"task.template": str(template)}))[0]

    first = run("a")
    assert not _first_job(first)["reused_shared_result"]
    assert _first_job(run("b"))["reused_shared_result"]  # the same contents: shared

    items = data / "u.item"
    items.write_text(items.read_text(encoding="latin-1").replace("Sunny", "Cloudy"), encoding="latin-1")
    retitled = run("c")
    assert not _first_job(retitled)["reused_shared_result"]
    assert retitled["stages"][0]["metrics"] != first["stages"][0]["metrics"]

    template.write_text(template.read_text(encoding="utf-8").replace("Will", "Would"), encoding="utf-8")
    assert not _first_job(run("d"))["reused_shared_result"]
    assert _first_job(run("e"))["reused_shared_result"]  # the edited files, now stored


def test_experiments_differing_in_later_budgets_share_stage_1(sunny_dir: Path, tmp_path: Path) -> None:
    """The budgets pick rows, and a job's rows are in its key: another budget for stage 2 leaves stage 1
    shared. Gradient checkpointing does not: with LoRA dropout it trains another adapter (the shared prompt
    prefix runs in every row, where dropout draws other masks), which a run without it reused as its own."""
    base = {**ONE, "train.samples_per_stage": "[32, 16]", "train.valid_samples": "[16, 8]"}
    first = run_experiment(tiny_config(sunny_dir, tmp_path, name="a", **base))[0]
    later = {**base, "train.samples_per_stage": "[32, 8]", "train.valid_samples": "[16, 4]"}
    other = run_experiment(tiny_config(sunny_dir, tmp_path, name="b", **later))[0]
    assert (
        _first_job(other)["reused_shared_result"]
        and not other["stages"][1]["jobs"][0]["reused_shared_result"]
    )
    assert other["stages"][0]["metrics"] == first["stages"][0]["metrics"]
    ckpt = run_experiment(
        tiny_config(sunny_dir, tmp_path, name="c", **base, **{"train.gradient_checkpointing": True})
    )
    assert not _first_job(ckpt[0])["reused_shared_result"]
    # with a template that has a shared prefix (tallrec's) the two train other adapters: what reuse hid
    tallrec = {**base, "task.template": "tallrec"}
    plain = run_experiment(tiny_config(sunny_dir, tmp_path, name="d", **tallrec))[0]
    on = {**tallrec, "train.gradient_checkpointing": True}
    checkpointed = run_experiment(tiny_config(sunny_dir, tmp_path, name="e", **on))[0]
    assert checkpointed["stages"][0]["metrics"] != plain["stages"][0]["metrics"]


def _legacy_jobs(out: Path) -> set[str]:
    return {p.name for p in (out / "_shared" / "jobs").iterdir() if p.is_dir()}


def test_jobs_an_older_evolora_stored_serve_only_the_experiment_that_used_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Keys before 2026-12-05 left the inputs' digests out. An experiment continued after the upgrade still
    reuses the jobs its stage records name, those it trained and those it took from a sibling experiment
    then (its inputs unchanged: the experiment checks them); another experiment does not, since under the
    same paths it may have read other contents."""
    data = write_sunny_rainy(tmp_path / "data")
    out = tmp_path / "runs"
    with monkeypatch.context() as m:
        m.setattr(SharedStore, "job_key", SharedStore.legacy_job_key)  # as an older evolora keyed them
        run_experiment(tiny_config(data, out, name="old", strategies="[frozen]", **{"train.epochs": 1}))
        sibling = run_experiment(tiny_config(data, out, name="sibling", **ONE))[0]  # frozen's stage 1, reused
    jobs = _legacy_jobs(out)
    assert len(jobs) == 1 and _first_job(sibling)["reused_shared_result"]  # stage 1, trained once

    both = {**ONE, "strategies": "[frozen, finetune]"}
    for name in ("old", "sibling"):  # the one that trained it, and the one that reused it then
        continued = run_experiment(tiny_config(data, out, name=name, **both))
        for result in continued:
            assert _first_job(result)["shared_key"] in jobs, (name, result["method"])
    assert not (set(p.name for p in (out / "_shared" / "jobs").iterdir() if p.is_dir()) - jobs)  # none new
    other = run_experiment(tiny_config(data, out, name="new", **ONE))[0]
    assert not _first_job(other)["reused_shared_result"] and _first_job(other)["shared_key"] not in jobs
    assert other["stages"][0]["metrics"] == sibling["stages"][0]["metrics"]  # the same data: same figures


def test_an_overwritten_experiment_never_reuses_what_it_stored_before(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--overwrite (what the data-changed refusal advises) starts the experiment afresh: jobs an older
    evolora stored for its former self, from other data, are not its own, also in the second worker of
    --jobs 2, which sets up once the first has made a stage folder (played here in one process)."""
    from evolora import experiment

    data = write_sunny_rainy(tmp_path / "data")
    out = tmp_path / "runs"
    over = {**ONE, "seeds": "[0, 1]"}
    with monkeypatch.context() as m:
        m.setattr(SharedStore, "job_key", SharedStore.legacy_job_key)
        run_experiment(tiny_config(data, out, name="x", **over))
    jobs = _legacy_jobs(out)
    items = data / "u.item"
    items.write_text(items.read_text(encoding="latin-1").replace("Sunny", "Cloudy"), encoding="latin-1")

    def second_worker(cfg, root, context_key, pairs, workers, *decided):
        (root / "finetune" / "seed0" / "stage-1").mkdir(parents=True)  # the first worker's
        return experiment._run_locked(cfg, root, context_key, None, pairs, *decided)

    monkeypatch.setattr(experiment, "_run_in_workers", second_worker)
    again = run_experiment(tiny_config(data, out, name="x", **over), overwrite=True, jobs=2)
    for result in again:
        assert _first_job(result)["shared_key"] not in jobs, result["seed"]


def test_an_experiment_whose_template_file_changed_is_not_continued(sunny_dir: Path, tmp_path: Path) -> None:
    """As for its data: a template file edited in place would give the stages left other prompts than the
    finished ones."""
    template = tmp_path / "prompt.txt"
    template.write_text("Liked: {preference}\nDisliked: {unpreference}\nThe user and {target}?\nAnswer:")
    cfg = tiny_config(sunny_dir, tmp_path / "runs", **ONE, **{"task.template": str(template)})
    run_experiment(cfg)
    run_experiment(cfg)  # unchanged: nothing to do, no refusal
    template.write_text(template.read_text().replace("The user", "This user"))
    with pytest.raises(ConfigError, match=r"the prompt template \(task.template: .*prompt.txt\) changed"):
        run_experiment(cfg)


def test_other_weights_saved_under_the_same_model_folder_are_trained_again(
    sunny_dir: Path, tmp_path: Path
) -> None:
    """`model.name` is a folder whose weights were saved again (another seed): the second experiment trains
    its own stage 1 instead of loading an adapter trained on other weights; the same weights share it."""
    folder = tmp_path / "model"

    def save(seed: int) -> str:
        return save_tiny_model(folder, seed)

    def run(name: str) -> dict:
        cfg = tiny_config(sunny_dir, tmp_path / "runs", name=name, **ONE, **{"model.name": str(folder)})
        return run_experiment(cfg)[0]

    first = save(0)
    assert not _first_job(run("a"))["reused_shared_result"]
    assert _first_job(run("b"))["reused_shared_result"]
    assert save(7) != first and save(0) == first  # a fingerprint of the weights, the same for the same ones
    save(7)
    assert not _first_job(run("c"))["reused_shared_result"]
    save(0)  # experiment c continued on other weights than its finished stage trained on: refused
    with pytest.raises(ConfigError, match=r"the weights of model.name=.*model changed since"):
        run("c")


def test_the_weights_fingerprint_reads_values_not_names() -> None:
    """The same weights under other parameter names or with another buffer (what a library upgrade may
    change) keep their fingerprint; a changed value it samples does not."""
    import torch

    from evolora.models.tiny import build_tiny
    from evolora.models.weights import weights_fingerprint

    model, _ = build_tiny(seed=0)
    first = weights_fingerprint(model)
    renamed = torch.nn.ModuleDict({"wrapped": model})
    renamed.register_buffer("rotary_cache", torch.arange(5.0))
    assert weights_fingerprint(renamed) == first
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] += 1.0  # the first value is always sampled
    assert weights_fingerprint(model) != first


def test_loading_a_run_on_other_weights_says_so(
    sunny_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`recommend`, `serve` and `export` (`Recommender.load`) on other weights than the run trained on (its
    model folder saved again) still answer, and say that the answers are not the run's."""
    import logging

    import evolora

    folder = tmp_path / "model"
    save_tiny_model(folder, 0)
    cfg = tiny_config(sunny_dir, tmp_path / "runs", **ONE, **{"model.name": str(folder)})
    run_experiment(cfg)
    root = Path(cfg.output_dir) / cfg.name
    with caplog.at_level(logging.WARNING, logger="evolora"):
        evolora.Recommender.load(root)
    assert "not those its adapters were trained on" not in caplog.text
    save_tiny_model(folder, 7)
    with caplog.at_level(logging.WARNING, logger="evolora"):
        assert evolora.Recommender.load(root).known_users
    assert "not those its adapters were trained on" in caplog.text
