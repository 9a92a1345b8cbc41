"""`evolora export-user-adapter`: one RecLoRA sample's personalized adapter as a folder that transformers
and PEFT use without evolora.

    <out>/
        adapter_config.json        one plain rank-r PEFT LoRA (`combine: factors`), on the run's base
        adapter_model.safetensors
        tokenizer files            the run's tokenizer
        evolora_user_adapter.json  what it is: the run, method, seed and stage; the sample (user, target item,
                                   the stage it is in, its label); the sample's prompt as text and as the
                                   ids the run scored, the answer tokens; and the run's P(like) for it
        README.md                  code that scores the sample with transformers and PEFT alone

RecLoRA's router reads the user's history and the target item, so an adapter belongs to one sample: the folder
scores that prompt, and another candidate needs its own export (`--item`). The README loads the base in fp32;
the P(like) recorded is the run's, in the precision it ran in (`precision`), so a bf16-mixed run's differs in
the last digits.

Two kinds of sample. From the run's own stages (`--stage`, or a run never updated): the user's latest sample
of the run's data judged after that stage, with its label. From a deployed run's version (`--version`, or the
promoted one of a run an update changed, as `export` and `recommend` default to it): the query that version
answers for the user and an `--item`, the user's history as of its newest data in the prompt, no label; the
P(like) is what `recommend` gives for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from evolora.errors import ConfigError, UnknownIdError
from evolora.export import BaseWeights
from evolora.io import atomic_directory, check_replaceable
from evolora.locks import sole_writer
from evolora.models.personalized import USER_ADAPTER_MARKER
from evolora.progress import task as progress_task

log = logging.getLogger("evolora")


def export_user_adapter(
    run_dir: str | Path,
    user: str,
    out: str | Path | None = None,
    method: str | None = None,
    seed: int | None = None,
    stage: int | None = None,
    item: str | None = None,
    model: str | Path | None = None,
    version: int | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Write the adapter of `user`'s latest sample judged after training `stage` (default: the run's last),
    or of their latest sample whose target is `item`, into `out` (default:
    `<run>/stage-<t>/user-adapters/<user>[-<item>]`; replaced atomically); or, from a deployed run's
    `version` (default: the promoted one, where an update's is), the adapter it answers `user` and `item`
    with (`<version's stage folder>/user-adapters/<user>-<item>`). Returns the folder and what its
    `evolora_user_adapter.json` records. `model`: where the run's base model lies now (`Recommender.load`)."""
    from evolora.continual import STRATEGIES
    from evolora.continual.base import StageContext
    from evolora.data.samples import eval_stage_of
    from evolora.deploy.versions import Versions
    from evolora.experiment import restore_run
    from evolora.queries import last_trained_stage, locate_run, read_results

    seed_dir, root = locate_run(Path(run_dir), method, seed)
    results = read_results(seed_dir)
    strategy_name = results.get("strategy")
    if not hasattr(STRATEGIES.get(strategy_name), "user_row"):  # before the data and model load
        raise ConfigError(f"{seed_dir}: a {strategy_name} run has no per-user adapters (reclora has)")
    last = last_trained_stage(results)
    registry = Versions.of_run(root, results)
    if stage is not None and version is not None:
        raise ConfigError("give a stage or a version, not both (a version names its stage)")
    if stage is None and version is None and registry.promoted != 0:
        version = registry.promoted  # the model served, as `export` and `recommend` default to
    if version is not None:
        chosen = registry.get(version)
        if chosen.id > 0:
            return _export_version_query(seed_dir, results, chosen, last, user, item, out, model)
        stage = chosen.stage  # version 0: the run as `evolora run` left it
    by_update = [
        v.id for v in registry.versions if v.id and v.stage == stage and stage is not None and stage > last
    ]
    if by_update:  # (restore_run would say the run never trained it)
        raise ConfigError(
            f"stage {stage} was trained by an update: give its version (--version {by_update[-1]}; "
            f"`evolora versions` lists them); --stage names the run's own stages (its last is {last})"
        )
    if out is not None:  # before the model is loaded
        out = check_replaceable(out, USER_ADAPTER_MARKER, "user adapter")
    with progress_task(f"loading {results['method']} (its data and model)", None):  # seconds
        strategy, prepared, t = restore_run(seed_dir, stage, model)
    try:
        strategy.personal.check_exportable()
        judged = eval_stage_of(t, strategy.cfg.protocol)
        row = strategy.user_row(user, judged, item)
        sample = strategy.task.table.df.row(row, named=True)  # its ids as the run writes them
        user, item = str(sample["user_id"]), None if item is None else str(sample["item_id"])
        target = out or _default_folder(seed_dir / f"stage-{t}", user, item)
        ctx = StageContext(
            t, judged, prepared.pools, results["seed"], seed_dir / f"stage-{t}", asked="scoring the sample"
        )
        p_like = float(strategy.predict(ctx, np.array([row]))[0])  # the run's own score of the sample
        the_sample = {
            "user": user,
            "item": str(sample["item_id"]),
            "stage": int(sample["stage"]),
            "label": int(sample["label"]),
        }
        base = BaseWeights.of(strategy.cfg.model.name, strategy.cfg.model.revision)
        record = _record(strategy, seed_dir, results, t, None, row, the_sample, p_like, base)
        _write(target, strategy, row, record, base)
    finally:
        strategy.teardown()
    log.info("exported user %s's adapter (sample %d, stage %d) to %s", user, row, t, target)
    return target, record


def _export_version_query(
    seed_dir: Path,
    results: dict[str, Any],
    version: Any,
    last: int,
    user: str,
    item: str | None,
    out: str | Path | None,
    model: str | Path | None,
) -> tuple[Path, dict[str, Any]]:
    """The adapter deployed version `version` answers `user` and `item` with, as `recommend` asks it: the
    user's history as of the version's newest data, the item as target."""
    from evolora.api import Recommender

    if item is None:  # the version's own data has no sample to default to: its batches trained it
        raise ConfigError(
            f"version {version.id} (stage {version.stage}) answers a user and an item with an adapter of "
            f"their own: pass --item (or --stage, up to {last}, for a sample of the run's own stages)"
        )
    if out is not None:  # before the model is loaded
        out = check_replaceable(out, USER_ADAPTER_MARKER, "user adapter")
    rec = Recommender.load(seed_dir, version=version.id, model=model)
    strategy = rec.strategy
    try:
        strategy.personal.check_exportable()
        try:
            user = rec.user_id(str(user))  # as the run writes it
        except UnknownIdError:  # (its message advises giving a history, which this command takes not)
            raise ConfigError(
                f"unknown user {user!r}: version {version.id} knows {len(rec.known_users_set)} users up to "
                f"stage {rec.eval_stage}, and exports the adapter of one of them"
            ) from None
        scored = rec.score(user=user, items=[item])[0]  # leaves the query's one row as the strategy's task
        item = scored.item  # as the run writes it
        target = out or _default_folder(seed_dir.parent.parent / version.folder, user, item)
        query = {"user": user, "item": item, "stage": rec.eval_stage, "label": None}
        base = BaseWeights.of(strategy.cfg.model.name, strategy.cfg.model.revision)
        record = _record(strategy, seed_dir, results, version.stage, version.id, 0, query, scored.score, base)
        _write(target, strategy, 0, record, base)
    finally:
        strategy.teardown()
    log.info("exported user %s's adapter for item %s (version %d) to %s", user, item, version.id, target)
    return target, record


def _write(target: Path, strategy: Any, row: int, record: dict[str, Any], base: BaseWeights) -> None:
    """The folder: the adapter of the task's sample `row`, the tokenizer, the record and the README."""
    # one writer of the folder at a time; what a killed export left beside it goes first
    with sole_writer(target, f"export to {target}"):
        check_replaceable(target, USER_ADAPTER_MARKER, "user adapter")  # (again, under the lock)
        with atomic_directory(target) as folder:
            strategy.personal.write_adapter(strategy.z[row], folder, strategy.cfg.model.revision)
            strategy.lm.tokenizer.save_pretrained(folder)
            (folder / USER_ADAPTER_MARKER).write_text(json.dumps(record, indent=2, ensure_ascii=False))
            (folder / "README.md").write_text(_readme(record, target, base))


def _default_folder(stage_folder: Path, user: str, item: str | None) -> Path:
    """`<stage_folder>/user-adapters/<user>[-<item>]`, unless it holds the adapter of another user (or item):
    ids with a `-` name some pairs alike (user `a` with item `sku-1`, user `a-sku` with item `1`), and one
    export must not replace the other's."""
    name = folder_name(user if item is None else f"{user}-{item}")
    target = check_replaceable(stage_folder / "user-adapters" / name, USER_ADAPTER_MARKER, "user adapter")
    try:
        earlier = json.loads((target / USER_ADAPTER_MARKER).read_text(encoding="utf-8"))["sample"]
        named = (earlier["user"], earlier["item"] if item is not None else None)
    except (OSError, ValueError, KeyError, TypeError):  # none, or damaged: replaced as an earlier export
        return target
    if named != (user, item):
        whose = f"user {named[0]!r}" + ("" if item is None else f" and item {named[1]!r}")
        raise ConfigError(
            f"{target} holds the adapter of {whose}, whose ids name the same folder: give --out to write "
            "this one elsewhere"
        )
    return target


def folder_name(name: str) -> str:
    """`name` as one folder name: path separators, `%`, control characters and a leading dot written as %XX
    (an id like `a/b` or `..` must not reach another folder)."""
    out = "".join(f"%{ord(c):02X}" if c in "%/\\" or ord(c) < 32 or ord(c) == 127 else c for c in name)
    return "%2E" + out[1:] if out.startswith(".") else out


def _record(
    strategy: Any,
    seed_dir: Path,
    results: dict,
    t: int,
    version: int | None,
    row: int,
    sample: dict[str, Any],
    p_like: float,
    base: BaseWeights,
) -> dict[str, Any]:
    task, cfg = strategy.task, strategy.cfg
    ids = list(task.prefix) + list(task.encode(row).body)
    return {
        "run": str(seed_dir.resolve()),
        "method": results["method"],
        "strategy": results["strategy"],
        "seed": results["seed"],
        "stage": t,  # the training stage whose banks, gates and router made the adapter
        "version": version,  # the deployed version that trained it (None: a stage of the run's own)
        "precision": results.get("precision"),
        "base_model": cfg.model.name,
        "base_revision": base.revision,
        "base_weights": base.load,  # the folder or hub id the run's base weights load from
        "converted_base": base.converted,
        "rank": cfg.model.lora.r,
        "sample": sample,  # user, item, the stage it is in, its label (None: a query has none)
        "prompt": {
            "text": task.tok.decode(ids),
            "input_ids": ids,
            "yes_id": task.yes_id,
            "no_id": task.no_id,
            "answer": "P(like) = softmax(logits[yes_id], logits[no_id])[0] at the last prompt token",
        },
        "p_like": p_like,
    }


def _readme(record: dict[str, Any], folder: Path, base: BaseWeights) -> str:
    """How to score the sample with transformers and PEFT alone (a test runs this code)."""
    sample, version = record["sample"], record["version"]
    trained = (
        f"after stage {record['stage']}" if version is None else f"version {version}, stage {record['stage']}"
    )
    head = (
        f"# RecLoRA adapter of user {sample['user']} for item {sample['item']}\n\n"
        f"Exported by evolora from `{record['run']}` ({record['method']}, seed {record['seed']}, {trained}). "
        "RecLoRA's router reads the user's history and the target item, so this adapter belongs to one "
        "sample: the prompt in `evolora_user_adapter.json`. Another item needs its own export (`evolora "
        f"export-user-adapter RUN USER --item ITEM{'' if version is None else f' --version {version}'}`)."
    )
    if base.converted:
        head += f"{base.provenance()}."
    code = "\n".join(
        [
            "import json",
            "from pathlib import Path",
            "",
            "import torch",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "",
            f"folder = Path({str(folder.resolve())!r})  # this folder",
            'about = json.loads((folder / "evolora_user_adapter.json").read_text())',
            "model = AutoModelForCausalLM.from_pretrained(",
            '    about["base_weights"], revision=about["base_revision"], dtype=torch.float32',
            ")",
            "model = PeftModel.from_pretrained(model, folder).eval()",
            'prompt = about["prompt"]',
            "with torch.no_grad():",
            '    last = model(input_ids=torch.tensor([prompt["input_ids"]])).logits[0, -1].float()',
            'p_like = torch.softmax(last[[prompt["yes_id"], prompt["no_id"]]], 0)[0].item()',
        ]
    )
    own = f"{record['p_like']:.6f}, in {record['precision']}"
    return (
        f"{head}\n\n```python\n{code}\n```\n\n`p_like` is the probability that the user likes the item; "
        f'the run\'s own is `about["p_like"]` ({own}; this code runs fp32).\n'
    )
