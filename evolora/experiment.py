"""An experiment: one dataset, one task, one backbone, several strategies and seeds run side by side.

    runs/<name>/experiment.json        what fixes the results (checked on every rerun)
    runs/<name>/config.yaml            the resolved configuration
    runs/<name>/log.txt                everything logged, appended across reruns
    runs/_shared/                      training results and predictions shared between strategies and
                                       experiments (content-addressed)
    runs/<name>/<label>/seed<k>/       one strategy and seed: stage-*/ and results.json

Every strategy sees the same stages, the same samples (for a given seed) and the same evaluation rows, so
the comparison is paired. With `jobs` > 1 the (strategy, seed) pairs run in worker processes
(`workers.py`), each setting up the experiment as a single process would, one at a time. Under
`accelerate launch` every process runs this same sequence on its share of each batch (`parallel.py`).

Past ~400 lines: the settings checks, the set-up and the serial and parallel drivers of an experiment are
one sequence that rerun safety depends on; split, each part would need the others' invariants restated.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch
import yaml

import evolora
from evolora import cost, parallel
from evolora.allocator import keep_freed_memory
from evolora.bundle import check_template, keep_template, run_config, write_bundle
from evolora.config import (
    DataConfig,
    RunConfig,
    StrategySpec,
    config_changes,
    config_to_dict,
    definite_candidates,
    folder_name,
    parse_override,
)
from evolora.continual import (
    Env,
    build_strategy,
    check_strategy_specs,
    option_changes,
    resolved_options,
    run_options,
)
from evolora.continual.loop import StageLoop, is_trained
from evolora.continual.shared import SharedStore, recorded_shared_keys, remove_stale_shared_temporaries
from evolora.data import InteractionData
from evolora.data.digest import changed_files, data_digest, file_sha256
from evolora.data.loaders import detect_format, names_a_dataset
from evolora.data.prepare import Prepared, prepare_data
from evolora.errors import ConfigError, EvoloraError, ModelNotFoundError, forget_warnings
from evolora.io import (
    atomic_write_json,
    atomic_write_text,
    check_writable_folder,
    finite_json,
    other_entries,
    read_json,
    remove_stale_temporaries,
    stable_hash,
)
from evolora.locks import exclusive
from evolora.models.conventional import check_conventional, is_conventional
from evolora.models.conventional.backbone import ConventionalBackbone
from evolora.models.llm import LoraLM, count_tokens_of, set_threads
from evolora.models.precision import (
    check_machine,
    machine,
    precision_name,
    resolve_device,
    resolve_precision,
)
from evolora.models.weights import load_pretrained, weights_fingerprint
from evolora.progress import task as progress_task
from evolora.queries import read_results, trained_stage
from evolora.tasks import task_spec
from evolora.tasks.base import Task
from evolora.tasks.semantic import caches_by_settings
from evolora.tracking import Tracker, check_tracking, tracker_for
from evolora.workers import WORKER_ENV, devices_for, run_workers, take, work_queue, worker_label

__all__ = ["Prepared", "build_model_and_task", "prepare_data", "restore_run", "run_experiment"]

log = logging.getLogger("evolora")

# Keys that do not change any number a run produces: they may differ between reruns of one experiment. (In
# fp32, up to float summation order; under bf16-mixed a batch size or thread count also moves where products
# round to bf16, ~1e-2 in a P(like): noise of that precision, as between two machines, not a setting.)
_NEUTRAL_KEYS = {
    ("name",),
    ("output_dir",),
    ("strategies",),
    ("seeds",),
    ("threads",),
    ("eval", "batch_size"),
    ("update",),  # how later updates are gated: not this run's numbers
    ("tracking",),
    ("tracking_uri",),
}


def context_of(cfg: RunConfig) -> dict[str, Any]:
    """The part of the configuration that fixes data, samples and training, as a plain dict."""
    d = config_to_dict(cfg)
    for path in _NEUTRAL_KEYS:
        node = d
        for p in path[:-1]:
            node = node[p]
        node.pop(path[-1], None)
    d["model"].pop("device", None)
    # Only the settings the backbone reads: LLM keys for an LLM, `conventional` for a conventional model.
    llm_only = ("revision", "precision", "lora")
    for key in llm_only if is_conventional(cfg.model.name) else ("conventional",):
        d["model"].pop(key, None)
    return d


def resolve_config(cfg: RunConfig) -> RunConfig:
    """The config with `auto` settings that depend on the data or the machine made definite, so the
    experiment's key records what runs: `staging.scheme: auto` is `preset` for a dataset that comes in
    stages (PESO's release, a table with a stage column), else `lsat`; `model.precision: auto` is what this
    machine runs (bf16-mixed on a CPU with native bf16, fp32 on one without), so a folder is never resumed
    in another precision."""
    if cfg.staging.scheme == "auto":
        scheme = "preset" if comes_in_stages(cfg.data) else "lsat"
        cfg = cfg.model_copy(update={"staging": cfg.staging.model_copy(update={"scheme": scheme})})
    if cfg.model.precision == "auto" and not is_conventional(cfg.model.name):
        resolved = precision_name("auto", resolve_device(cfg.model.device))
        cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"precision": resolved})})
    return cfg


def comes_in_stages(data: DataConfig) -> bool:
    """Whether the data source comes with stages of its own: PESO's pre-blocked release, or a table whose
    `data.columns.stage` names each row's stage."""
    if data.format == "table":
        return data.columns is not None and data.columns.stage is not None
    if data.format != "auto":
        return data.format == "peso"
    if names_a_dataset(data.source):
        return False  # none of the registered datasets comes in stages
    try:
        return detect_format(Path(data.source).expanduser()) == "peso"
    except EvoloraError:
        return False  # the loader reports the problem with the data itself


def run_environment(data: InteractionData) -> dict[str, Any]:
    """What a run's numbers also depend on beyond its config: software versions and the data files read."""
    import platform
    from importlib.metadata import version

    return {
        "evolora_version": evolora.__version__,
        "machine": machine(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            # read from the installed packages: importing them here took seconds, billed as the data's
            "transformers": version("transformers"),
            "peft": version("peft"),
        },
        "data_files": data_digest(data),
    }


def _import_what_training_imports() -> None:
    """A conventional model loads no library at set-up, so the first optimiser of the process imported
    torch._dynamo (~3 CPU s) inside stage 1 of whichever run came first: set-up's cost, as an LLM's loading
    pays it."""
    with cost.part("model_loading"):
        import torch._dynamo  # noqa: F401


def load_backbone(cfg: RunConfig) -> tuple[Any, Any]:
    """(model, tokenizer) of `cfg.model`, without adapters, in the run's precision on its device.

    A QLoRA base is loaded quantized, once; item embeddings (semantic IDs) read it as it is."""
    device = resolve_device(cfg.model.device)
    dtype, _ = resolve_precision(cfg.model.precision, device)
    m = cfg.model
    with cost.part("model_loading"):
        model, tokenizer = load_pretrained(m.name, dtype, m.revision, m.quantization, device)
    count_tokens_of(model)  # the item embeddings' passes read it before any adapter is added
    return model, tokenizer


def build_model_and_task(
    cfg: RunConfig, prepared: Prepared, pretrained: tuple[Any, Any] | None = None
) -> tuple[LoraLM | ConventionalBackbone, Task]:
    """The backbone with its adapter and the task, as the task's registry entry builds them.

    A conventional `model.name` (pop, mf, gru4rec, sasrec, two_tower, din) gives a `ConventionalBackbone` over
    the users and items of the staged data and the conventional version of the task, on the same samples.
    `pretrained`: the backbone `load_backbone` gave, when the caller needed it before (loaded otherwise).
    """
    spec = task_spec(cfg.task.name)
    if is_conventional(cfg.model.name):
        check_conventional(cfg)
        if spec.build_conventional is None:
            raise ConfigError(f"task {spec.name!r} has no version for conventional models ({cfg.model.name})")
        space = prepared.id_space()
        backbone = ConventionalBackbone.from_config(cfg.model, space, prepared.data.items)
        return backbone, spec.build_conventional(cfg, prepared, space)
    return spec.build(cfg, prepared, pretrained or load_backbone(cfg))


def _check_experiment(root: Path, cfg: RunConfig) -> str:
    """The experiment's key; refuses a folder holding results of other settings.

    A folder whose earlier attempt produced nothing (it failed before any stage work, e.g. on a misspelt
    model name) takes the new settings: there is nothing they could be mixed with.
    """
    context = context_of(cfg)
    key = stable_hash(context, 16)
    marker = root / "experiment.json"
    if marker.is_file():
        old = read_json(marker, "Delete it to accept the current settings (nothing is recomputed by that).")
        if old.get("context_key") != key and _same_experiment(root, old.get("context", {}), context):
            log.info("%s: settings recorded as auto are now written out (the same experiment)", root)
        elif old.get("context_key") != key and _inputs_moved(old.get("context", {}), context, old):
            diff = config_changes(old.get("context", {}), context)
            log.info(
                "%s: its input files moved (%s): continued where their contents are as recorded", root, diff
            )
        elif old.get("context_key") != key:
            diff = config_changes(old.get("context", {}), context)
            if _has_work(root):
                raise ConfigError(
                    f"{root} holds an experiment run with a different configuration ({diff}). "
                    "Rerun with the original settings to resume it, choose another `name`, or pass "
                    "--overwrite to delete it and start again."
                )
            log.info("%s: the earlier attempt produced nothing; its settings are replaced (%s)", root, diff)
    kept = {}
    # A continued experiment keeps the digests of what it read (`_check_data`, `_check_inputs`).
    if marker.is_file() and _has_work(root):
        inputs = ("data_files", "template_sha256", "weights_fingerprint", "caches")
        kept = {k: v for k, v in read_json(marker).items() if k in inputs}
    atomic_write_json(
        marker, {"context_key": key, "context": context, "evolora_version": evolora.__version__, **kept}
    )
    atomic_write_text(root / "config.yaml", yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    return key


def _same_experiment(root: Path, old: dict[str, Any], new: dict[str, Any]) -> bool:
    """Settings that differ only in how an `auto` was recorded: next-item candidates given as the model's
    own default, or an experiment recorded before `precision: auto` was resolved in its key whose runs all
    ran in the precision `auto` means here."""
    old, new = definite_candidates(old), definite_candidates(new)
    precision = new.get("model", {}).get("precision")
    if old.get("model", {}).get("precision") == "auto" and precision not in (None, "auto"):
        recorded = {read_json(f).get("precision") for f in root.glob("*/seed*/results.json")}
        if not recorded <= {precision}:
            return False
        old = {**old, "model": {**old["model"], "precision": precision}}
    return stable_hash(old, 16) == stable_hash(new, 16)


def _inputs_moved(old: dict[str, Any], new: dict[str, Any], recorded: dict[str, Any]) -> bool:
    """Settings that differ only in where the experiment's input files are (a run folder copied to another
    machine, its files to other paths): `data.source` / `data.meta` where the files the experiment recorded
    are found there by name with the sha256s it recorded; `model.name` and `task.template` where the new
    path exists and the experiment recorded the weights' fingerprint / the template's digest, which
    `_check_inputs` compares once they are loaded. The same inputs, moved."""
    places = {("data", "source"), ("data", "meta"), ("model", "name"), ("task", "template")}

    def at(context: dict[str, Any], section: str, key: str) -> Any:
        return context.get(section, {}).get(key)

    def elsewhere(context: dict[str, Any]) -> str:
        shown = {k: dict(v) if isinstance(v, dict) else v for k, v in context.items()}
        for section, key in places:
            if isinstance(shown.get(section), dict):
                shown[section].pop(key, None)
        return stable_hash(shown, 16)

    moved = {(s, k) for s, k in places if at(old, s, k) != at(new, s, k)}
    if not moved or elsewhere(old) != elsewhere(new):
        return False
    checked_later = (("model", "name", "weights_fingerprint"), ("task", "template", "template_sha256"))
    for section, key, digest in checked_later:
        path = at(new, section, key)
        if (section, key) in moved and not (
            isinstance(path, str) and Path(path).expanduser().exists() and recorded.get(digest)
        ):
            return False
    if moved & {("data", "source"), ("data", "meta")}:
        files = (recorded.get("data_files") or {}).get("files")
        if not isinstance(files, dict) or not files:
            return False
        found: dict[str, Path] = {}
        for key in ("source", "meta"):
            place = at(new, "data", key)
            path = Path(place).expanduser() if isinstance(place, str) else None
            if path is not None and path.is_file():
                found[path.name] = path
            elif path is not None and path.is_dir():
                found.update({f.name: f for f in path.iterdir() if f.is_file()})
        try:
            return all(n in found and file_sha256(found[n]) == sha for n, sha in files.items())
        except OSError:
            return False
    return True


def shared_store(cfg: RunConfig, root: Path, contents: dict[str, Any], continuing: bool) -> SharedStore:
    """The output folder's store of shared jobs and predictions, keyed for this experiment: its settings but
    `train` and `eval` (jobs are keyed by their exact rows and stage settings), and `contents`, what it read
    under paths and names: the data files', the prompt template's and the model weights' digests (a file
    edited in place, or other weights under one model name, keep the settings). `continuing`: the
    experiment had work before this command (not new, not replaced by --overwrite), and its inputs were
    checked unchanged, so jobs an older evolora stored for it, keyed without the digests, are its own."""
    sample_context = {k: v for k, v in context_of(cfg).items() if k not in ("train", "eval")}
    return SharedStore(
        cfg.shared_root,
        stable_hash({**sample_context, "contents": contents}, 16),
        legacy_context_key=stable_hash(sample_context, 16),
        own_keys=recorded_shared_keys(root) if continuing else frozenset(),
        continuing=continuing,
    )


def _check_inputs(root: Path, cfg: RunConfig, task: Task, weights: str | None) -> str | None:
    """The digest of the task's prompt template text (None for a task without one). Refuse to continue an
    experiment whose template or model weights (`weights`: their fingerprint) changed since it started: a
    file edited in place, or other weights under one `model.name`, keep the settings while the finished
    stages were trained on the old ones. Record both the first time."""
    text = getattr(task, "template", None)
    digests = {
        "template_sha256": None if text is None else hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "weights_fingerprint": weights,
    }
    what = {
        "template_sha256": f"the prompt template (task.template: {getattr(cfg.task, 'template', '')})",
        "weights_fingerprint": f"the weights of model.name={cfg.model.name}",
    }
    marker = root / "experiment.json"
    recorded = read_json(marker, "Delete it to accept the current settings.")
    changed = [what[k] for k, v in digests.items() if recorded.get(k) not in (None, v)]
    if changed and _has_work(root):
        raise ConfigError(
            f"{root}: {' and '.join(changed)} changed since this experiment started: its finished stages "
            "were trained and scored with the old ones. Restore them, choose another `name`, or pass "
            "--overwrite to start again."
        )
    if any(recorded.get(k) != v for k, v in digests.items() if v is not None):
        atomic_write_json(marker, {**recorded, **{k: v for k, v in digests.items() if v is not None}})
    return digests["template_sha256"]


def with_model_at(cfg: RunConfig, model: str | Path | None) -> RunConfig:
    """`cfg` with its LLM's base weights read from `model` (a folder or a hub name) instead of `model.name`:
    a trained run answered or updated where its base model lies elsewhere (a run folder copied to a serving
    machine). None keeps `model.name`. Whether they are the weights it ran on is told once they are loaded
    (`other_weights`, from the fingerprint the experiment recorded)."""
    if model is None:
        return cfg
    if is_conventional(cfg.model.name):
        raise ConfigError(f"model={model}: a {cfg.model.name} run has no base model to load from elsewhere")
    name = str(model).strip()
    if not name:
        raise ConfigError("model: a folder or a hub name, not an empty string")
    path = Path(name).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"model={model}: a file; the base model is a folder (config.json and its weights)")
    name = str(path.resolve()) if path.is_dir() else name
    return cfg.model_copy(update={"model": cfg.model.model_copy(update={"name": name})})


def trained_backbone(cfg: RunConfig, name_it: str) -> tuple[Any, Any] | None:
    """`load_backbone` for a trained run (None for a conventional model); where its base model cannot be
    found, the error says how to name where it lies now (`name_it`: the option that does)."""
    if is_conventional(cfg.model.name):
        return None
    try:
        return load_backbone(cfg)
    except ModelNotFoundError as e:
        raise ModelNotFoundError(f"{e} A trained run whose base model lies elsewhere now: {name_it}.") from e


def answering_backbone(cfg: RunConfig, root: Path, where: Path) -> tuple[Any, Any] | None:
    """`trained_backbone` for answering with a trained run's adapters (`Recommender`, a user adapter's
    export): weights other than those the experiment at `root` recorded are loaded with a warning naming
    `where` (served, not refused: a user may mean it; the figures of the run are not those of this model)."""
    pretrained = trained_backbone(cfg, "--model PATH names it (model= in Python)")
    if other_weights(root, pretrained):
        log.warning(
            "%s: the weights loaded for model.name=%s are not those its adapters were trained on (another "
            "folder's contents, the hub's weights instead of evolora's converted copy or the reverse): its "
            "answers are not the run's; load the weights it ran on",
            where, cfg.model.name,
        )  # fmt: skip
    return pretrained


def other_weights(root: Path, pretrained: tuple[Any, Any] | None) -> bool:
    """Whether `pretrained` (a loaded backbone; None for a conventional model) holds other weights than the
    experiment at `root` recorded when it started (`_check_inputs`; an older evolora recorded none)."""
    marker = root / "experiment.json"
    recorded = read_json(marker).get("weights_fingerprint") if marker.is_file() else None
    return pretrained is not None and recorded is not None and weights_fingerprint(pretrained[0]) != recorded


def own_caches(root: Path, cfg: RunConfig, data: InteractionData) -> dict[str, Path]:
    """The cache files (item embeddings, semantic IDs) the experiment at `root` was built from, those that
    exist: as its experiment.json names them (`_record_caches`), else, for an experiment of an evolora
    before 2026-12-05, where that kept them (keyed by settings). A continued experiment, and a trained run's
    bundle rebuilt, read these rather than what the current data and weights would key: the finished
    stages were trained on them."""
    marker = root / "experiment.json"
    recorded = read_json(marker).get("caches") if marker.is_file() else None
    if recorded is None:
        return caches_by_settings(cfg, data)
    paths = {kind: cfg.shared_root / inside for kind, inside in recorded.items()}
    return {kind: path for kind, path in paths.items() if path.is_file()}


def _record_caches(root: Path, cfg: RunConfig, prepared: Prepared) -> None:
    """Name in experiment.json the cache files the task was built from (relative to `cfg.shared_root`)."""
    caches = {
        kind: path.relative_to(cfg.shared_root).as_posix()
        for kind, path in prepared.caches.items()
        if path.is_relative_to(cfg.shared_root)
    }
    marker = root / "experiment.json"
    recorded = read_json(marker, "Delete it to accept the current settings.")
    if recorded.get("caches") != caches:
        atomic_write_json(marker, {**recorded, "caches": caches})


def _check_data(root: Path, files: dict[str, Any]) -> None:
    """Refuse to continue an experiment whose data files changed content since it started (its settings
    may be the same while its stages would not be); record the files' digest the first time."""
    marker = root / "experiment.json"
    recorded = read_json(marker, "Delete it to accept the current settings.")
    before = recorded.get("data_files")
    if before is not None and before.get("sha256") != files.get("sha256") and _has_work(root):
        changed = changed_files(before, files)
        raise ConfigError(
            f"{root}: the data changed since this experiment started ({', '.join(changed) or 'its files'}): "
            "its finished stages were cut from the old content. Choose another `name`, pass --overwrite to "
            "start again, or bring new data in with `evolora update`."
        )
    if before != files:
        atomic_write_json(marker, {**recorded, "data_files": files})


def _has_work(root: Path) -> bool:
    """Whether any run under the experiment folder has started a stage (a checkpoint, a job, a record)."""
    return any(p.is_dir() for p in root.glob("*/seed*/stage-*"))


def method_label(cfg: RunConfig, spec: StrategySpec) -> str:
    """`RunConfig.label_of`: the strategy's name in results, reports and run folders."""
    return cfg.label_of(spec)


def run_dir_of(cfg: RunConfig, label: str, seed: int) -> Path:
    """The folder of one run; `label` is its `method_label`."""
    return Path(cfg.output_dir) / cfg.name / label / f"seed{seed}"


def where_its_config_lies(config: str | Path, cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """`cfg` read from `config` with `overrides` (`--set` strings); where that file is the `config.yaml` of an
    experiment folder that is not the one its `output_dir` and `name` name (the folder was moved, copied or
    renamed), and no override names output_dir or name, the folder it lies in, with a warning: rerunning a
    copy's own config trained everything again at the old place. (`name` is no part of an experiment's key.)
    """
    folder = Path(config).expanduser().resolve().parent
    if any(parse_override(s)[0] in (["output_dir"], ["name"]) for s in overrides):
        return cfg
    if Path(config).name != "config.yaml" or not (folder / "experiment.json").is_file():
        return cfg
    named = (Path(cfg.output_dir).expanduser() / cfg.name).resolve()
    if named == folder:
        return cfg
    try:
        name = folder_name(folder.name)
    except ValueError:  # renamed to what no experiment may be named ("_old", ".bak"): said, not silent
        raise ConfigError(
            f"{config} is the config of the experiment in {folder}, which it names {named}; {folder.name!r} "
            "is no experiment name (not starting with '.' or '_'): rename the folder, or choose the place "
            "with --set output_dir=... --set name=..."
        ) from None
    log.warning(
        "%s is the config of the experiment in %s, which it names %s (moved, copied or renamed since): "
        "continuing it where the config lies (--set output_dir=... --set name=... chooses another place)",
        config, folder, named,
    )  # fmt: skip
    return cfg.model_copy(update={"output_dir": str(folder.parent), "name": name})


def run_experiment(
    cfg: RunConfig, overwrite: bool = False, on_stage: Any = None, jobs: int = 1
) -> list[dict[str, Any]]:
    """Run every (strategy, seed) of the config; finished stages are never redone. Returns their results.

    One process at a time per experiment folder: a second one is refused, naming the first. `jobs` > 1
    runs the (strategy, seed) pairs in that many worker processes (`evolora/workers.py`), one device each
    where several GPUs are, the CPU threads split between them; the numbers are those of `jobs=1` (in fp32;
    under bf16-mixed, up to bf16 rounding).

    In a process that does other things (a notebook, a service), an experiment leaves the caller's torch
    thread count and random state as they were, and one runs at a time: a second started from another
    thread meanwhile is refused (they would share the process's threads, random state and logger).
    """
    with training_in_this_process():
        return _run_experiment(cfg, overwrite, on_stage, jobs)


_training = threading.Lock()


@contextlib.contextmanager
def training_in_this_process() -> Iterator[None]:
    """Around an experiment or an update: the caller's torch thread count and random state are put back after
    it, and a second one started meanwhile from another thread is refused (they would share the process's
    threads, random state and logger)."""
    if not _training.acquire(blocking=False):
        raise ConfigError(
            "another experiment or update runs in this process (from another thread): run them one after "
            "another, or in separate processes (`jobs`, or one command each)"
        )
    threads = torch.get_num_threads()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        torch.set_num_threads(threads)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
        _training.release()


def _run_experiment(cfg: RunConfig, overwrite: bool, on_stage: Any, jobs: int) -> list[dict[str, Any]]:
    forget_warnings()  # each experiment's log.txt says its own
    if jobs < 1:
        raise ConfigError(f"--jobs {jobs}: give 1 or more worker processes")
    if jobs > 1 and on_stage is not None:
        raise ValueError("on_stage callbacks run in the calling process: use jobs=1")
    parallel.start(cfg.model.device)
    if parallel.active():
        cfg = _for_this_process(cfg)
        if parallel.sharded():
            _check_shardable(cfg)
        if jobs > 1:
            raise ConfigError(
                f"--jobs {jobs} inside a {parallel.world_size()}-process launch: the launch already splits "
                "the work; use one or the other"
            )
    check_strategy_specs(cfg.strategies, cfg)
    check_conventional(cfg)
    if cfg.train.select_by == "last":  # said, not silent: these read the validation that `last` skips
        unread = [k for k in ("patience", "keep_start_if_better") if getattr(cfg.train, k)]
        if unread:
            log.warning(
                "train.%s: not read with train.select_by: last (no validation); ignored",
                ", train.".join(unread),
            )
    check_tracking(cfg, open_store=parallel.is_main())  # one process of a launch opens the store
    if not is_conventional(cfg.model.name):
        check_machine(cfg.model.precision, cfg.model.quantization, cfg.model.device)
    set_threads(cfg.threads)
    cfg = resolve_config(cfg)
    root = Path(cfg.output_dir) / cfg.name
    check_writable_folder(Path(cfg.output_dir), "output_dir")
    lock = Path(cfg.output_dir) / f".{cfg.name}.lock"  # beside the folder: --overwrite deletes the folder
    # --overwrite moves the old experiment here and deletes it once the new one has finished: settings that
    # fail (a misspelt column or model) before any stage is trained put it back as it was.
    if root.is_symlink() and not root.exists():
        raise ConfigError(
            f"{root} links to {os.readlink(root)}, which does not exist: make that folder, or remove the link"
        )
    # A linked experiment folder (on another disk) is moved aside and made again where the link points, so the
    # link stays good (moved aside itself, the link could not be deleted at the end: "rmtree on a symlink").
    real = root.resolve() if root.is_symlink() else root
    replaced = real.with_name(f".{real.name}.replaced")  # not a name an experiment can have
    if root.exists() and not root.is_dir():
        raise ConfigError(f"{root} is a file, not an experiment folder: choose another name or output_dir")
    with exclusive(lock, f"experiment {root}"):
        # Every experiment writes experiment.json first: a folder holding other files without it is someone
        # else's (a config.yaml is no sign: it is a common name), neither deleted nor written among. (The
        # main process decides: the others would look while it moves the folder aside.)
        foreign = other_entries(real, "experiment.json") if parallel.writes() else []
        if foreign and not _experiment_without_its_marker(real):
            holds = f"{', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
            what = f"{root} is not an experiment folder (no experiment.json; it holds {holds})"
            fate = ", so it is not deleted" if overwrite else ": a run would write its files among them"
            raise ConfigError(
                f"{'--overwrite: ' if overwrite else ''}{what}{fate}; choose another name or output_dir"
            )
        if overwrite and root.exists() and parallel.writes():
            if replaced.exists():
                # An --overwrite interrupted before: `replaced` is the experiment it replaces, `root` that
                # attempt's unfinished work, continued by the same command (kill it anywhere, rerun it:
                # nothing finished is redone) and replaced in turn by one of other settings.
                if not _same_settings(real, cfg):
                    shutil.rmtree(real)
                else:
                    log.info("%s: continuing the --overwrite attempt that was interrupted", root)
            else:
                real.rename(replaced)
            if real is not root:
                real.mkdir(exist_ok=True)
        if parallel.writes():  # what killed writes left (updates under deploy/ hold locks of their own)
            remove_stale_temporaries(root, keep=("deploy",))
            remove_stale_shared_temporaries(cfg.shared_root)
        parallel.barrier()
        try:
            context_key = _check_experiment(root, cfg)
            _check_runs(cfg)
            # Once, before any worker makes a stage folder; under a launch, the main process's view for all
            # (they must agree on what they reuse, and the others may look after it started a stage)
            continuing = parallel.gather(_has_work(root))[0]
            pairs = [(i, seed) for i in range(len(cfg.strategies)) for seed in cfg.seeds]
            # A worker sets up (data, model) before its first pair: one per pair left to train, no more.
            left = [p for p in pairs if not _finished(cfg, *p)]
            if jobs > 1 and len(left) > 1:
                results = _run_in_workers(cfg, root, context_key, pairs, min(jobs, len(left)), continuing)
            else:
                results = _run_locked(cfg, root, context_key, on_stage, pairs, continuing)
        except BaseException:
            if parallel.writes() and replaced.exists():
                _restore_if_untrained(real, replaced)
            raise
        if parallel.writes() and replaced.exists():
            shutil.rmtree(replaced)
        return results


def _experiment_without_its_marker(folder: Path) -> bool:
    """An experiment whose experiment.json was deleted, as a damaged one's error advises: its config.yaml
    beside the run folders evolora made (each with its run.json from its start)."""
    return (folder / "config.yaml").is_file() and any(folder.glob("*/seed*/run.json"))


def _finished(cfg: RunConfig, index: int, seed: int) -> bool:
    """Whether the run of strategy `index` and `seed` recorded every stage (its results.json says so)."""
    path = run_dir_of(cfg, method_label(cfg, cfg.strategies[index]), seed) / "results.json"
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("complete") is True
    except (OSError, ValueError, AttributeError):
        return False


def _check_runs(cfg: RunConfig) -> None:
    """Every run folder the experiment continues was made with its strategy's options: all that were not are
    refused at once, before any training (the stage loop checks each again as it starts)."""
    found = []
    for spec in cfg.strategies:
        options = resolved_options(spec)
        for seed in cfg.seeds:
            changes = option_changes(run_dir_of(cfg, method_label(cfg, spec), seed), spec.name, options)
            if changes is not None:
                found.append(changes)
    if len(found) == 1:
        raise ConfigError(found[0].message())
    if found:
        folders: dict[tuple[str, str], list[str]] = {}  # the seeds of a label differ alike: listed once
        for c in found:
            folders.setdefault((c.changes, c.pin), []).append(str(c.run_dir))
        listed = "; ".join(
            f"{', '.join(f)} ({changes}{f'; ran as {pin}' if pin else ''})"
            for (changes, pin), f in folders.items()
        )
        raise ConfigError(
            f"run folders made with other options: {listed}. Where a default changed since, pin what they "
            "ran with; or give those strategies other labels, or delete their folders to rerun them."
        )


def _same_settings(root: Path, cfg: RunConfig) -> bool:
    """Whether the experiment folder `root` was made by the same command as `cfg`: its config.yaml holds every
    setting of `cfg` (strategies and seeds too, which its key leaves out), CPU threads aside."""
    try:
        recorded = yaml.safe_load((root / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):  # gone or damaged: nothing to continue
        return False
    if not isinstance(recorded, dict):
        return False
    now = yaml.safe_load(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    for settings in (recorded, now):
        settings.pop("threads", None)
    return recorded == now


def _restore_if_untrained(root: Path, replaced: Path) -> None:
    """After a failed run: the experiment --overwrite replaced comes back unless the new one trained a
    stage (then that one is kept, resumable, and the old one stays aside until it finishes)."""
    if any(is_trained(stage) for stage in root.glob("*/seed*/stage-*")):
        log.warning("%s replaced %s, which is kept aside until this one finishes", root, replaced)
        return
    shutil.rmtree(root, ignore_errors=True)
    replaced.rename(root)
    log.warning("the new settings failed before training a stage: %s is as it was before --overwrite", root)


def _for_this_process(cfg: RunConfig) -> RunConfig:
    """In a multi-process launch: this process's GPU, or on CPUs its share of the cores (unless `threads`
    says otherwise)."""
    dev = parallel.device()
    model = cfg.model
    if dev is not None and dev.type == "cuda":
        model = model.model_copy(update={"device": str(dev)})
    elif model.device == "auto":
        model = model.model_copy(update={"device": "cpu"})
    local = int(os.environ.get("LOCAL_WORLD_SIZE", parallel.world_size()))
    threads = cfg.threads or (_cores_each(local) if model.device == "cpu" else None)
    if not parallel.is_main():  # one voice: the main process logs (and warns) what every process does
        logging.getLogger("evolora").setLevel(logging.ERROR)
    return cfg.model_copy(update={"model": model, "threads": threads})


def _check_shardable(cfg: RunConfig) -> None:
    """FSDP shards an unquantized LLM backbone's decoder layers (`parallel.shard_layers`)."""
    if is_conventional(cfg.model.name):
        raise ConfigError(
            f"FSDP launch for the conventional model {cfg.model.name}: it has no LLM layers to shard; "
            f"launch with DDP ({parallel.ACCELERATE_CONFIGS / 'ddp.yaml'})"
        )
    if cfg.model.quantization != "none":
        raise ConfigError(
            f"FSDP launch with model.quantization: {cfg.model.quantization}: sharding a quantized base is "
            f"not built; launch QLoRA with DDP ({parallel.ACCELERATE_CONFIGS / 'ddp.yaml'}) or leave "
            "quantization none"
        )


def _cores_each(processes: int) -> int:
    """The CPU threads each of `processes` processes on this machine gets."""
    return max(1, (os.cpu_count() or 1) // processes)


def _run_locked(
    cfg: RunConfig,
    root: Path,
    context_key: str,
    on_stage: Any,
    pairs: Iterable[tuple[int, int]],
    continuing: bool,
) -> list[dict[str, Any]]:
    # The run's log is the main process's (the others of a launch compute the same steps)
    handler = _RunLog(root / "log.txt") if parallel.writes() else logging.NullHandler()
    handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {_who()}%(name)s: %(message)s"))
    logger = logging.getLogger("evolora")
    logger.addHandler(handler)
    level, propagate = logger.level, logger.propagate
    # The Python API leaves the logger unset: log.txt still holds the whole log, as under the CLI, while
    # the script's own handlers (the root's) get what they got before, from the root's level up.
    forward = _ToRoot(logging.getLogger().getEffectiveLevel())
    if level == logging.NOTSET:
        logger.setLevel(logging.INFO)
        logger.propagate = False
        logger.addHandler(forward)
    # Workers of --jobs N set up one at a time: the first fetches data and fills the caches (item vectors,
    # semantic IDs) and the inference bundle, the others find them.
    setup = exclusive(root / ".setup.lock", "setting up", wait=True) if os.environ.get(WORKER_ENV) else None
    try:
        with setup or contextlib.nullcontext(), parallel.main_first():
            started = cost.clock()
            cost.take()
            with cost.part("data"), progress_task("reading and staging the data", None):
                prepared = prepare_data(cfg)
                environment = run_environment(prepared.data)  # file digests included
            _check_data(root, environment["data_files"])
            pretrained = None if is_conventional(cfg.model.name) else load_backbone(cfg)
            if pretrained is None:
                _import_what_training_imports()
            weights = weights_fingerprint(pretrained[0]) if pretrained is not None else None
            if continuing:  # (its data and weights are checked unchanged below, before any training)
                prepared.caches = own_caches(root, cfg, prepared.data)
            lm, task = build_model_and_task(cfg, prepared, pretrained)
            template = _check_inputs(root, cfg, task, weights)
            keep_template(root, cfg, getattr(task, "template", None))  # what inference and updates read
            _record_caches(root, cfg, prepared)
            data_sha256 = environment["data_files"]["sha256"]
            write_bundle(root, cfg, prepared, context_key, data_sha256)  # what `Recommender.load` needs
            contents = {"data_sha256": data_sha256, "template_sha256": template, "weights": weights}
            if isinstance(getattr(lm, "trainable_token_indices", None), dict):
                # An untied output layer's rows of added tokens train since 2026-12-05: jobs stored before
                # left them at their initialisation, and are not another experiment's to reuse.
                contents["token_rows"] = "input and output layers"
        if parallel.sharded():  # FSDP: after set-up, which runs in one process at a time
            lm.shard()
        # Once per experiment (per process; a launch's processes together): the data, the model, item
        # embeddings, RQ-VAE, the bundle
        setup_cost = cost.stage_cost(cost.take(), since=started)
        environment["setup_cost"] = cost.of_processes(parallel.gather(setup_cost))
        environment["setup_id"] = uuid.uuid4().hex[:12]  # this process's sitting: a report counts it once
        shared = shared_store(cfg, root, contents, continuing)
        tracker = tracker_for(cfg, root) if parallel.is_main() else Tracker()
        with tracker.experiment(cfg):
            return _run_strategies(
                cfg, prepared, lm, task, shared, context_key, environment, tracker, on_stage, pairs
            )
    except BaseException as e:
        if isinstance(handler, _RunLog):
            handler.stopped(e)
        raise
    finally:
        logger.removeHandler(handler)
        logger.removeHandler(forward)
        logger.setLevel(level)
        logger.propagate = propagate
        handler.close()


class _RunLog(logging.FileHandler):
    """The run's log.txt. It also says why a run stopped (the terminal alone showed it). A write that fails
    (a full disk, a file-size limit) is said once on stderr and the file left for the rest of the sitting:
    logging's own answer was a traceback for every message."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, encoding="utf-8")
        self.failed = False

    def emit(self, record: logging.LogRecord) -> None:
        if not self.failed:
            super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        if not self.failed:
            self.failed = True
            reason = sys.exc_info()[1]
            sys.stderr.write(
                f"evolora: {self.baseFilename} cannot be written ({reason}); this sitting's log goes on "
                "here only\n"
            )

    def close(self) -> None:
        try:
            super().close()  # flushes: the full disk answers again
        except OSError as e:
            self.handleError(logging.makeLogRecord({"msg": str(e)}))

    def stopped(self, e: BaseException) -> None:
        # A user's mistake or the machine's answer in its line; anything else with its traceback
        told = isinstance(e, EvoloraError | OSError | KeyboardInterrupt)
        reason = "interrupted" if isinstance(e, KeyboardInterrupt) else f"{type(e).__name__}: {e}"
        record = logging.LogRecord(
            "evolora", logging.ERROR, __file__, 0, "stopped: %s", (reason,),
            None if told else (type(e), e, e.__traceback__),
        )  # fmt: skip
        self.handle(record)


class _ToRoot(logging.Handler):
    """Records from `level` up, on to the root logger's handlers (what propagation gave them)."""

    def emit(self, record: logging.LogRecord) -> None:
        logging.getLogger().handle(record)


def _who() -> str:
    label = os.environ.get(WORKER_ENV)
    return f"[{label}] " if label else ""


def _run_in_workers(
    cfg: RunConfig, root: Path, context_key: str, pairs: list[tuple[int, int]], jobs: int, continuing: bool
) -> list[dict[str, Any]]:
    """The pairs run by `jobs` worker processes, each taking the next pair when it is free (the caller holds
    the experiment's lock throughout; each worker loads its own data and model)."""
    devices = devices_for(cfg.model.device, jobs)
    threads = cfg.threads or _cores_each(jobs)
    names = ", ".join(f"{method_label(cfg, cfg.strategies[k])} (seed {seed})" for k, seed in pairs)
    where = ", ".join(dict.fromkeys(devices))  # each device once, in order
    log.info("%d workers (%s, %d threads each) take these pairs in turn: %s", jobs, where, threads, names)
    # Pairs left to train first, so each worker's first pair is work; the finished ones are looked at after
    # (their record rewritten, a stage tracking missed logged), as a run of one process does.
    work = work_queue(sorted(pairs, key=lambda p: _finished(cfg, *p)), jobs)
    data = cfg.model_dump(mode="json")
    with tracker_for(cfg, root).experiment(cfg):  # made here: every worker nests its runs under it
        run_workers(
            _worker_main,
            [(data, str(root), context_key, work, device, threads, continuing) for device in devices],
        )
    results = []
    for index, seed in pairs:
        run_dir = run_dir_of(cfg, method_label(cfg, cfg.strategies[index]), seed)
        results.append(read_json(run_dir / "results.json", "Rerun the experiment: it is rebuilt."))
    return results


def _worker_main(
    cfg_data: dict[str, Any],
    root: str,
    context_key: str,
    work: Any,
    device: str,
    threads: int,
    continuing: bool,
) -> None:
    """One worker of `--jobs N`: its own data, model and task, then pairs from `work` until none is left
    (spawned: nothing inherited)."""
    cfg = RunConfig.model_validate(cfg_data)
    model = cfg.model.model_copy(update={"device": device})
    cfg = cfg.model_copy(update={"model": model, "threads": threads})
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(f"{_who()}%(levelname)s %(message)s"))
    logger = logging.getLogger("evolora")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    for noisy in ("transformers", "peft", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    set_threads(threads)
    keep_freed_memory()
    pairs = (tuple(p) for p in take(work))
    first = next(pairs, None)  # before the set-up: a worker left without a pair loads nothing
    if first is not None:
        _run_locked(cfg, Path(root), context_key, None, itertools.chain([first], pairs), continuing)


def _run_strategies(
    cfg: RunConfig,
    prepared: Prepared,
    lm: LoraLM | ConventionalBackbone,
    task: Task,
    shared: SharedStore,
    context_key: str,
    environment: dict[str, Any],
    tracker: Tracker,
    on_stage: Any,
    pairs: Iterable[tuple[int, int]],
) -> list[dict[str, Any]]:
    """The (strategy index, seed) `pairs` in turn, each through the stage loop."""
    all_results = []
    for index, seed in pairs:
        spec = cfg.strategies[index]
        lm.reset_to(["default"])
        strategy = build_strategy(spec, Env(lm, task, cfg, prepared), seed)
        label = method_label(cfg, spec)
        header = {
            "method": label,
            "strategy": spec.name,
            "options": strategy.options.model_dump(mode="json"),
            "task": task.name,
            "dataset": prepared.data.name,
            "model": cfg.model.name,
            "precision": getattr(lm, "precision", "fp32"),
            "seed": seed,
            "protocol": cfg.protocol,
            "candidates": task.candidate_set,  # what a ranking was chosen among (next-item)
            "n_stages": prepared.table.n_stages,
            "experiment": cfg.name,
            "context_key": context_key,
            "worker": worker_label(),  # the process that ran it (`worker i/N` under --jobs N)
            **environment,
        }
        log.info("running %s (seed %d)", label, seed)
        run_dir = run_dir_of(cfg, label, seed)
        loop = StageLoop(strategy, prepared.pools, run_dir, shared, header)

        def stage_done(results: dict[str, Any], run_dir: Path = run_dir) -> None:
            record = results["stages"][-1]
            tracker.stage(record, run_dir / f"stage-{record['train_stage']}")
            if on_stage is not None:
                on_stage(results)

        try:
            with tracker.run(label, seed, header, run_dir):
                all_results.append(loop.run(stage_done))
        finally:
            strategy.teardown()  # hooks a strategy put on the shared model go with it
    shortened = getattr(task, "shortened", 0)
    if shortened:
        log.info("%d prompts were shortened to fit task.max_length", shortened)
    # As results.json holds them (an undefined figure None, not NaN), as a `--jobs N` run reads them back
    return [finite_json(r) for r in all_results]


def restore_run(
    run_dir: Path, stage: int | None = None, model: str | Path | None = None
) -> tuple[Any, Prepared, int]:
    """A finished run's strategy as it stood after training stage `stage` (default: its last stage), its
    base model read from `model` where given (`with_model_at`).

    Rebuilds the experiment's data, backbone and task from `config.yaml` two folders up (on the item
    caches the experiment was built from, `own_caches`; its output folder where it is now), the strategy
    from the run's own record, then loads the adapters and state the loop saved. Returns (strategy,
    prepared data, stage); the caller calls `strategy.teardown()` when done.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "results.json").is_file():
        raise ConfigError(
            f"{run_dir}: not a run folder (no results.json; expected runs/<name>/<method>/seed<k>)"
        )
    results = read_results(run_dir)
    config = run_dir.parent.parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"{config}: missing; the experiment's configuration is needed to rebuild the run")
    root = run_dir.parent.parent
    cfg = run_config(root).model_copy(update={"output_dir": str(root.parent)})  # (a moved folder)
    cfg = with_model_at(cfg, model)
    t = trained_stage(run_dir, results, stage, cfg.protocol)
    # the options it ran with, defaults as they were then: a default changed since must not change it
    spec = StrategySpec(name=results["strategy"], label=results["method"], **run_options(run_dir, results))
    prepared = prepare_data(cfg)
    prepared.caches = own_caches(root, cfg, prepared.data)  # those its stages were trained on
    lm, task = build_model_and_task(cfg, prepared, answering_backbone(cfg, root, root))
    check_template(root, task)
    strategy = build_strategy(spec, Env(lm, task, cfg, prepared), results["seed"])
    strategy.setup()
    loop = StageLoop(strategy, prepared.pools, run_dir, None, {})
    task.before_stage(lm, t)
    loop.restore_state(t)
    return strategy, prepared, t
