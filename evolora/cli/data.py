"""`evolora data`: fetch a registered dataset, summarise a dataset and its stages, and write one out as CSV
files of a team's own log. Registered on `evolora.cli.data_app`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from evolora.cli import _setup_logging, _user_errors, console, data_app, err_console


@data_app.command("fetch")
@_user_errors
def data_fetch(
    name: Annotated[str, typer.Argument(help="dataset name, e.g. ml-100k")],
    force: Annotated[bool, typer.Option(help="download again even if cached")] = False,
) -> None:
    """Download a dataset (checksum-verified) into the cache."""
    from evolora import progress
    from evolora.data import fetch

    _setup_logging(False)
    with progress.display(err_console):  # the download's bar
        path = fetch(name, force=force)
    console.print(f"{name}: {path}")


# The options of the commands reading a dataset as a run would.
Format = Annotated[
    str | None, typer.Option("--format", help="file format when SOURCE is a path; default: the config's")
]
Meta = Annotated[str | None, typer.Option(help="Amazon metadata file, or a table's items table")]
FromConfig = Annotated[Path | None, typer.Option(help="take data and staging settings from this config")]
Sets = Annotated[list[str] | None, typer.Option("--set", "-s", help="override, e.g. staging.n_stages=5")]


@data_app.command("info")
@_user_errors
def data_info(
    source: Annotated[
        str | None,
        typer.Argument(
            help="a dataset name or a path, or a config (.yaml) to read as --config; default: the config's, "
            "else ml-100k"
        ),
    ] = None,
    fmt: Format = None,
    meta: Meta = None,
    config: FromConfig = None,
    set_: Sets = None,
) -> None:
    """Summarise a dataset and the stages its staging settings make."""
    from evolora.data import assign_stages, num_stages_of, stage_table

    _setup_logging(False)
    cfg, data = _read_data(source, fmt, meta, config, set_)
    summary = Table(title=f"{data.name}", show_header=False)
    for k, v in data.summary().items():
        summary.add_row(k, str(v))
    console.print(summary)
    staged = assign_stages(data.interactions, cfg.staging, data.preset_stages, data.synthetic_time)
    stages = stage_table(staged, None if data.implicit else data.like_threshold)
    t = Table(title=f"stages ({cfg.staging.scheme}, {num_stages_of(staged)})")
    for col in stages.columns:
        t.add_column(col.replace("_timestamp", "").replace("_", " "), justify="right")
    synthetic = data.synthetic_time  # PESO's release has only an order, no dates
    # Where a stage ends on the day the next begins, days alone look like an overlap: show the times.
    ends, starts = stages["last_timestamp"].to_list()[:-1], stages["first_timestamp"].to_list()[1:]
    precise = any(_date(a) == _date(b) for a, b in zip(ends, starts, strict=True))
    for row in stages.iter_rows(named=True):
        t.add_row(*(_stage_cell(k, v, synthetic, precise) for k, v in row.items()))
    console.print(t)


def _stage_cell(column: str, value: Any, synthetic_time: bool, precise: bool) -> str:
    if column.endswith("timestamp"):
        return "n/a" if synthetic_time else _date(value, precise)
    return f"{value:.4f}" if column == "liked" else str(value)


def _date(ts: int | None, precise: bool = False) -> str:
    from evolora.data.times import day

    return "–" if ts is None else day(ts, with_time=precise)


@data_app.command("to-csv")
@_user_errors
def data_to_csv(
    source: Annotated[
        str,
        typer.Argument(help="a dataset name (ml-100k) or a path, or a config (.yaml) to read as --config"),
    ],
    out_dir: Annotated[Path, typer.Argument(help="the folder the CSV files go into")],
    new_fraction: Annotated[
        float,
        typer.Option(
            help="the latest share of the rows written apart as new-interactions.csv: a batch for "
            "`evolora update` (0: none)"
        ),
    ] = 0.0,
    fmt: Format = None,
    meta: Meta = None,
    config: FromConfig = None,
    set_: Sets = None,
    overwrite: Annotated[
        bool,
        typer.Option(help="replace files of other rows in OUT_DIR (and remove a batch of an earlier cut)"),
    ] = False,
) -> None:
    """Write a dataset as a team's own log would be: CSV files, the latest rows apart as a batch.

    interactions.csv, items.csv and, with --new-fraction, the latest rows in new-interactions.csv (for
    `evolora update`); prints the data settings that read them back."""
    import yaml

    from evolora.data.as_table import check_new_fraction, write_as_table

    _setup_logging(False)
    check_new_fraction(new_fraction)  # before a large log is read
    _, data = _read_data(source, fmt, meta, config, set_)
    written = write_as_table(data, out_dir, new_fraction, overwrite=overwrite)
    for name, rows in written.rows.items():
        kept = " (already there)" if name in written.kept else ""
        console.print(f"{written.folder / name}: {rows} rows{kept}")
    console.print("\nread them with these data settings (data.format: table):\n")
    console.print(yaml.safe_dump({"data": written.settings}, sort_keys=False, width=1000).rstrip())


def _read_data(
    source: str | None, fmt: str | None, meta: str | None, config: Path | None, set_: list[str] | None
) -> tuple[Any, Any]:
    """The run's config for a data command's options (SOURCE may be a config file) and the data it loads."""
    from evolora import progress
    from evolora.config import load_config
    from evolora.data import load_dataset
    from evolora.experiment import resolve_config

    if source is not None and config is None and source.endswith((".yaml", ".yml")):
        source, config = None, Path(source)  # `evolora data info CONFIG`: what `evolora run CONFIG` reads
    given = {"data.source": source, "data.format": fmt, "data.meta": meta}
    # data commands stage and train nothing: the protocol does not apply (`single` is refused with next_stage)
    overrides = ["protocol=leave_last_out"] + [f"{k}={v}" for k, v in given.items() if v is not None]
    overrides += list(set_ or [])
    flags = {"data.source": "the SOURCE argument", "data.format": "--format", "data.meta": "--meta"}
    cfg = resolve_config(load_config(config, overrides, flags))
    with progress.display(err_console):  # downloading and reading a large log take a while
        return cfg, load_dataset(cfg.data)
