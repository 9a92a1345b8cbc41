"""The commands about a trained run: take it elsewhere (export, export-user-adapter), keep it current
(update, versions, rollback) and serve it (serve). Registered on `evolora.cli.app`; asking it is
`recommend.py`."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from evolora import progress
from evolora.cli import (
    BaseModel,
    Method,
    RunDir,
    Seed,
    Stage,
    Threads,
    Version,
    _quiet_libraries,
    _setup_logging,
    _user_errors,
    app,
    console,
    err_console,
)
from evolora.errors import EvoloraError
from evolora.io import finite_json


@app.command()
@_user_errors
def update(
    run_dir: RunDir,
    data: Annotated[Path, typer.Option(help="the new interactions, in a format the run's loader reads")],
    items: Annotated[
        Path | None,
        typer.Option(
            help="records of the batch's new items (title, ...) laid out as the run's data.meta table; "
            "known items keep theirs"
        ),
    ] = None,
    method: Method = None,
    seed: Seed = None,
    set_: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            "-s",
            help="gate settings, e.g. update.min_gain=0.0; threads=N; tracking=none or tracking_uri=URI",
        ),
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="print the outcome as JSON (for scripts: `promoted` says it)")
    ] = False,
) -> None:
    """Train the next stage of the promoted version on new data; promote it if the gate says so."""
    from evolora.allocator import keep_freed_memory
    from evolora.deploy.update import update_run

    _setup_logging(verbose)
    _quiet_libraries()
    keep_freed_memory()  # large tensors reuse freed memory instead of faulting in fresh pages
    with progress.display(err_console):
        outcome = update_run(run_dir, data, method=method, seed=seed, overrides=set_ or [], items_file=items)
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
    # columns only where versions record them (updates since 2026-12-06; next-item IDs named since 12-04)
    grown = any("new users" in v.data or "new items named" in v.data for v in registry.versions)
    costed = any("total_cpu_seconds" in v.cost for v in registry.versions)  # updates since 2026-12-05
    right = [
        "version",
        "parent",
        "stage",
        "rows",
        *(["new users", "new items"] if grown else []),
        *(["CPU s"] if costed else []),
    ]
    for col in ("version", "parent", "stage", "created", "data", *right[3:], "gate", "promoted"):
        table.add_column(col, justify="right" if col in right else "left")
    for v in registry.versions:
        rows = [f"{v.data['accepted']}/{v.data['rows_in_file']}" if "accepted" in v.data else ""]
        if grown:
            rows.append(str(v.data.get("new users", "")))
            rows.append(str(v.data.get("new items", v.data.get("new items named", ""))))
        if costed:  # what the update took (the run's stages record version 0's)
            rows.append(f"{v.cost['total_cpu_seconds']:.0f}" if "total_cpu_seconds" in v.cost else "")
        gate = (
            f"{v.gate['metric']} {_figure(v.gate['candidate'])} vs {_figure(v.gate['promoted'])}"
            if v.gate
            else ""
        )
        table.add_row(
            str(v.id), "" if v.parent is None else str(v.parent), str(v.stage),
            v.created.replace("T", " ")[:16],
            Path(v.data.get("file", v.data.get("source", ""))).name, *rows, gate,
            "yes" if v.id == registry.promoted else "",
        )  # fmt: skip
    console.print(table)


# A negative version is read as a number, not as an unknown option ("No such option: -1")
@app.command(context_settings={"ignore_unknown_options": True})
@_user_errors
def rollback(
    run_dir: RunDir,
    version: Annotated[int, typer.Argument(help="the version to promote again")],
    method: Method = None,
    seed: Seed = None,
) -> None:
    """Make an earlier version the promoted one (served; the next update builds on it)."""
    from evolora.locks import exclusive

    if version < 0:  # one line, where typer's own bound drew its usage box
        raise EvoloraError(f"version {version}: versions are numbered from 0 (`evolora versions` lists them)")
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
    console.print_json(json.dumps(finite_json(answer), allow_nan=False))


def _figure(value: float | None) -> str:
    """A gate's figure: undefined (null, or NaN in versions of older evolora) is 'undefined'."""
    return "undefined" if value is None or value != value else f"{value:.4f}"


def _registry(run_dir: Path, method: str | None, seed: int | None):
    from evolora.deploy.versions import Versions
    from evolora.queries import locate_run, read_results

    seed_dir, root = locate_run(run_dir, method, seed)
    results = read_results(seed_dir)
    return Versions.of_run(root, results)


@app.command()
@_user_errors
def serve(
    run_dir: RunDir,
    host: Annotated[str, typer.Option(help="the address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="the port to listen on")] = 8000,
    method: Method = None,
    seed: Seed = None,
    threads: Threads = None,
    max_batch: Annotated[
        int,
        typer.Option(
            min=1,
            help="samples one forward pass takes across concurrent clients; 1: every request alone, its "
            "answer the same to the last digit whatever the traffic (batched, rounding moves scores)",
        ),
    ] = 256,
    model: BaseModel = None,
) -> None:
    """Serve the promoted version over HTTP (POST /score, /recommend; GET /health, /version,
    /openapi.json), switching to a newly promoted one without dropping requests."""
    from evolora.deploy.server import listening_on
    from evolora.deploy.server import serve as serve_run
    from evolora.queries import locate_run

    _setup_logging(False)
    _quiet_libraries()
    with listening_on(host, port) as listeners:  # held from here on: no other process takes the port
        locate_run(Path(run_dir), method, seed)  # a folder that is not a run, or several methods: said first
        shown = f"[{host}]" if ":" in host else host  # an IPv6 address goes in brackets in a URL
        console.print(f"loading {run_dir}; http://{shown}:{port} answers once it is loaded")
        serve_run(
            run_dir, host=host, port=port, method=method, seed=seed, threads=threads, max_batch=max_batch,
            model=model, listeners=listeners,
            ready=lambda: console.print(
                f"serving {run_dir} on http://{shown}:{port} (OpenAPI: /openapi.json); Ctrl-C stops"
            ),
        )  # fmt: skip


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
    version: Version = None,
    merge: Annotated[bool, typer.Option(help="write the base model with the adapter merged in")] = False,
    model: BaseModel = None,
) -> None:
    """A trained run as a folder transformers + PEFT load without evolora (tokenizer, item map, one plain
    LoRA adapter with the added tokens' rows), or with --merge a full merged model."""
    from evolora.export import export_run

    _setup_logging(False)
    _quiet_libraries()
    with progress.display(err_console):  # loading the run takes seconds (a bar without steps)
        target = export_run(
            run_dir, out, method=method, seed=seed, stage=stage, merge=merge, version=version, model=model
        )
    console.print(f"exported to {target} (see {target / 'README.md'})")


@app.command("export-user-adapter")
@_user_errors
def export_user_adapter(
    run_dir: RunDir,
    user: Annotated[str, typer.Argument(help="user id as in the data")],
    method: Method = None,
    seed: Seed = None,
    stage: Annotated[
        int | None,
        typer.Option(
            help="training stage whose adapters to use; default: the last (a run an update changed: its "
            "promoted version's, see --version)"
        ),
    ] = None,
    item: Annotated[
        str | None,
        typer.Option(help="target item of the sample (default: the latest); of a version's query: needed"),
    ] = None,
    version: Annotated[
        int | None,
        typer.Option(help="a deployed run's version: the adapter it answers USER and --item with"),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="folder (new, empty, or an earlier adapter); default: <run>/stage-<t>/user-adapters/<user>"
            "[-<item>], a version's in its stage folder (a / or % in an id written %2F, %25)"
        ),
    ] = None,
    model: BaseModel = None,
) -> None:
    """RecLoRA: one user's personalized adapter as a plain PEFT LoRA that any PEFT model loads, with the
    sample's prompt, the run's score of it and a README that scores it with transformers and PEFT alone.
    A deployed run whose promoted version an update made exports that version's, for a query of USER and
    --item (as `recommend` answers it); --stage picks a stage of the run's own."""
    from evolora.export_user import export_user_adapter as export

    _setup_logging(False)
    _quiet_libraries()
    with progress.display(err_console):  # loading the run takes seconds (a bar without steps)
        target, record = export(run_dir, user, out, method, seed, stage, item, model, version)
    sample = record["sample"]
    if record["version"] is None:
        what = f"sample of stage {sample['stage']} with target item {sample['item']}"
        whose = f"stage {record['stage']}"
    else:
        what = f"query for item {sample['item']} with their history as of stage {sample['stage']}"
        whose = f"version {record['version']} (stage {record['stage']})"
    console.print(
        f"user {sample['user']}, {what} (P(like) {record['p_like']:.4f}): adapter of {whose} written to "
        f"{target} (see {target / 'README.md'})"
    )
