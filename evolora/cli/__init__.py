"""The `evolora` command line.

evolora run [CONFIG] [--set key=value ...]    run an experiment (no CONFIG: the quickstart)
evolora report RUN_DIR [RUN_DIR ...]          compare finished runs: markdown tables and a plot
evolora recommend RUN_DIR --user U | --history A,B [-k 10] [--json]   what a trained run recommends
evolora update RUN_DIR --data FILE            new data becomes the next stage, behind a gate
evolora versions RUN_DIR / rollback RUN_DIR V  a deployed run's versions; promote an earlier one
evolora serve RUN_DIR [--host --port]         serve the promoted version over HTTP
evolora export RUN_DIR --out DIR [--merge]   a trained run for transformers + PEFT (or vLLM) alone
evolora export-user-adapter RUN_DIR USER      RecLoRA: one user's adapter as a plain PEFT LoRA
evolora data fetch NAME                       download and cache a dataset
evolora data info SOURCE                      what a dataset holds and how it stages
evolora data to-csv SOURCE OUT_DIR            a dataset as CSV files of an own log (and a batch of new rows)

The set-up every command shares (its logging and one-line errors) sits here with `run` and `report`; the
data commands are in data.py, the trained run's in trained.py and recommend.py.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markdown import Markdown
from rich.markup import escape

from evolora.errors import EvoloraError

if TYPE_CHECKING:
    from evolora.eval.report import Report

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Continual LoRA adaptation of LLM recommenders."
)
data_app = typer.Typer(no_args_is_help=True, help="Fetch and inspect datasets.")
app.add_typer(data_app, name="data")


def _print_version(asked: bool) -> None:
    if asked:
        from evolora import __version__

        print(f"evolora {__version__}")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="print evolora's version"),
    ] = False,
) -> None:
    """Continual LoRA adaptation of LLM recommenders."""


def stdout_width() -> int | None:
    """Off a terminal (a pipe, a log, CI) rich fits tables to 80 columns, cutting figures to "0.…": there
    they take the width they need. A terminal's width, or COLUMNS when set, still decides (None)."""
    return None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 1000


# Printed text is taken as written: item titles, labels and paths come from users' data, where rich's markup
# ("[director's cut]" vanished, "[/i]" crashed) and emoji codes (":stars:") would rewrite or break them.
console = Console(stderr=False, soft_wrap=True, width=stdout_width(), markup=False, emoji=False)
err_console = Console(stderr=True, soft_wrap=True, markup=False, emoji=False)

# Arguments several commands take about a trained run.
RunDir = Annotated[Path, typer.Argument(help="an experiment folder (runs/<name>) or a run's folder")]
Method = Annotated[str | None, typer.Option(help="the strategy's label (when there are several)")]
Seed = Annotated[
    int | None, typer.Option(help="which seed's run; default: 0, or a run folder's own", show_default=False)
]
Stage = Annotated[
    int | None,
    typer.Option(help="the model after this stage; default: the last (a deployed run: its promoted version)"),
]
Version = Annotated[int | None, typer.Option(help="a deployed run's version; default: the promoted one")]
BaseModel = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="where the run's base LLM lies now, if not at its model.name (a run copied to another machine)",
        show_default=False,
    ),
]
Threads = Annotated[
    int | None, typer.Option(min=1, help="torch CPU threads; default: every core", show_default=False)
]


class _PlainHandler(logging.StreamHandler):
    """One line per message, never wrapped: what logs and CI captures want (stderr is not a terminal).

    Writes to whatever `sys.stderr` is at the time, as the rich console does."""

    @property  # type: ignore[override]
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value: object) -> None:
        pass


def _setup_logging(verbose: bool, quiet: bool = False) -> None:
    """Log to stderr: INFO (DEBUG with `verbose`; WARNING with `quiet`, for commands whose output is an
    answer to a query)."""
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler: logging.Handler
    if err_console.is_terminal:
        handler = RichHandler(console=err_console, show_path=False, show_time=False, markup=False)
    else:
        handler = _PlainHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    handler.setLevel(level)
    root = logging.getLogger("evolora")
    root.handlers = [h for h in root.handlers if not isinstance(h, RichHandler | _PlainHandler)]
    root.addHandler(handler)
    root.setLevel(min(level, logging.INFO))  # a run's log.txt holds INFO whatever the terminal shows
    for noisy in ("transformers", "peft", "accelerate", "httpx", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)


def _user_errors(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Print user mistakes as one message (exit 2), never as a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            if fn.__name__ != "run":
                _one_process(_command_name(fn.__name__))
            return fn(*args, **kwargs)
        except EvoloraError as e:
            _after_the_main_process()
            # soft_wrap: a message stays one line in logs and CI (rich wraps at 80 columns off a terminal)
            err_console.print(
                f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True, markup=True
            )
            raise typer.Exit(2) from None
        except OSError as e:
            # The machine's answer (a full disk, a folder made read-only, a file gone): one line, as for a
            # user mistake; -v adds the traceback. What was finished is kept (every write is atomic).
            _after_the_main_process()
            logging.getLogger("evolora").debug("where it failed", exc_info=True)
            resumable = "; nothing finished is lost: rerun the same command to continue" if fn.__name__ in (
                "run", "update") else ""  # fmt: skip
            err_console.print(
                f"[bold red]error:[/] {escape(os_error_text(e))}{resumable}",
                highlight=False, soft_wrap=True, markup=True,
            )  # fmt: skip
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            if not _other_process():  # Ctrl-C reaches every process of a launch: said once
                # only work that is kept can be continued (a server, a query, a report start over)
                resumable = ": rerun the same command to continue where it stopped" if fn.__name__ in (
                    "run", "update") else ""  # fmt: skip
                err_console.print(f"[yellow]interrupted[/]{resumable}", markup=True)
            raise typer.Exit(130) from None

    return wrapper


def os_error_text(e: OSError) -> str:
    """An operating-system error in one line: the path (both of a rename) and the system's reason."""
    reason = e.strerror or str(e) or type(e).__name__
    if e.filename is None:
        return reason
    paths = f"{e.filename}" + (f" -> {e.filename2}" if e.filename2 is not None else "")
    return f"{paths}: {reason}"


def _command_name(function: str) -> str:
    """The command as typed ("evolora data info"), not the function behind it (`data_info`)."""
    for group, words in ((app, "evolora"), (data_app, "evolora data")):
        for command in group.registered_commands:
            if command.callback is not None and command.callback.__name__ == function:
                return f"{words} {command.name or function.replace('_', '-')}"
    return f"evolora {function}"


def _after_the_main_process() -> None:
    """In a launch's other processes, wait a moment before printing an error: a mistake in the settings
    fails every process alike, and the launcher stops the others once the main one has said it, so it is said
    once. An error of this process alone is printed after the wait."""
    if _other_process():
        time.sleep(3.0)


def _other_process() -> bool:
    """Whether this is one of a launch's processes other than the main one."""
    from evolora import parallel

    return parallel.launched() and os.environ.get("RANK", "0") != "0"


def _one_process(command: str) -> None:
    """Only `run` splits its work across the processes of `accelerate launch`; any other command started
    so would run N times over the same files."""
    from evolora import parallel

    if parallel.launched():
        raise EvoloraError(f"`{command}` runs in one process: start it without accelerate launch")


def _quiet_libraries() -> None:
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning, module="peft")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


@app.command()
@_user_errors
def run(
    config: Annotated[
        Path | None,
        typer.Argument(
            help="YAML config, or a shipped config's name (forgetting-ctr-ml100k); default: the quickstart"
        ),
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", "-s", help="override a key, e.g. --set train.epochs=3")
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            help="start again: an existing experiment of the same name is moved aside, deleted when the new "
            "one finishes, and put back if the new one fails to start"
        ),
    ] = False,
    jobs: Annotated[
        int,
        typer.Option(
            "--jobs", "-j", help="worker processes for the (strategy, seed) pairs (one GPU each, if several)"
        ),
    ] = 1,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="debug lines, tracebacks, the libraries' own warnings")
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="warnings and the results only")] = False,
) -> None:
    """Run an experiment: every strategy and seed of CONFIG, stage by stage; rerun to resume."""
    from evolora import parallel, progress
    from evolora.allocator import keep_freed_memory
    from evolora.cli.tables import matrix_summary_table, stage_table, stage_table_note
    from evolora.config import QUICKSTART, load_config, shipped_config
    from evolora.eval.costs import time_taken
    from evolora.eval.report import compose_report
    from evolora.experiment import run_experiment, where_its_config_lies
    from evolora.tasks import task_spec

    if verbose and quiet:
        raise EvoloraError("give --verbose or --quiet, not both")
    _setup_logging(verbose, quiet=quiet)
    if not verbose:
        _quiet_libraries()
    if config is None:
        config = QUICKSTART
        console.print(f"no config given: running the quickstart ({config})")
    elif (shipped := shipped_config(config)) is not None:
        console.print(f"running evolora's shipped config {config} ({shipped})")
        config = shipped
    cfg = load_config(config, set_ or [])
    cfg = where_its_config_lies(config, cfg, set_ or [])
    parallel.start(cfg.model.device)  # under `accelerate launch`: the main process alone shows and writes
    keep_freed_memory()  # large tensors reuse freed memory instead of faulting in fresh pages
    shows = parallel.is_main() and not quiet
    with progress.display(err_console) if shows else contextlib.nullcontext():
        results = run_experiment(cfg, overwrite=overwrite, jobs=jobs)
    parallel.end()
    if not parallel.is_main():
        return
    recorded = {m for r in results for s in r["stages"] for m in s["metrics"]}
    # The task's columns that these runs record (a conventional ranker has no nll)
    shown = task_spec(cfg.task.name).metrics.shown
    metric_names = tuple(m for m in shown if m in recorded) or shown
    root = Path(cfg.output_dir) / cfg.name
    report = compose_report([root])
    # Written before anything is printed: a closed stdout (`| head`) must not cost the report
    write_report(report, root)
    console.print(stage_table(results, metric_names))
    console.print(stage_table_note(results), soft_wrap=True, highlight=False)
    # the report's lead metric: the first the task shows that these runs define (AUC on one label is not)
    matrix = matrix_summary_table(results, report.lead)
    if matrix is not None:
        console.print(matrix)
    taken = time_taken(report.groups)  # the whole, not training alone (`train s`); its parts: report.md
    if taken is not None:
        console.print(taken, highlight=False, soft_wrap=True)
    console.print(f"results: {root}/*/seed*/results.json; report: {root / 'report.md'}")


def write_report(report: Report, folder: Path) -> list[Path]:
    """report.md, report.json (listing the plots) and the plots into `folder`; an earlier report's plot of
    the same metric that this one does not write again (a matrix of other runs) is removed. Returns the
    plots."""
    from evolora.eval.plots import earlier_plots, write_plots
    from evolora.io import atomic_write_json, atomic_write_text

    earlier = earlier_plots(folder, report.lead)
    atomic_write_text(folder / "report.md", report.text)
    plots = write_plots(report.groups, report.lead, folder)
    atomic_write_json(folder / "report.json", {**report.data, "plots": [p.name for p in plots]}, strict=True)
    for name in earlier - {p.name for p in plots}:
        (folder / name).unlink(missing_ok=True)
    return plots


@app.command()
@_user_errors
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="run folders (searched for results.json)")],
    metric: Annotated[list[str] | None, typer.Option(help="metrics to tabulate; default per task")] = None,
    out: Annotated[
        Path | None, typer.Option(help="folder for report.md and the plot; default: the first run")
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            help="the method every difference and interval is taken against; default: finetune, if run"
        ),
    ] = None,
) -> None:
    """Compare runs: a markdown table of methods x stages (report.md; its numbers in report.json) and a PNG
    plot of the metric per stage."""
    from evolora import progress
    from evolora.eval.report import compose_report
    from evolora.io import check_writable_folder

    if out is not None and out.exists() and not out.is_dir():
        raise EvoloraError(f"--out {out} is a file; give a folder for report.md and the plots")
    # the folders made for a report that could not be composed go again, --out's parents made with it too
    made = [] if out is None else [f for f in (out, *out.parents) if not f.exists()]
    if out is not None:  # before minutes of bootstrap
        check_writable_folder(out, "--out")
    _setup_logging(False, quiet=True)  # warnings only: the report is the answer
    try:
        with progress.display(err_console):  # a bootstrap over many runs takes minutes
            report = compose_report(run_dirs, metric, baseline)
    except BaseException:
        for folder in made:
            if folder.is_dir() and not any(folder.iterdir()):
                folder.rmdir()
        raise
    target = out or (run_dirs[0] if run_dirs[0].is_dir() else run_dirs[0].parent)
    plots = write_report(report, target)
    console.print(Markdown(report.text))
    console.print(f"written: {target / 'report.md'}, {target / 'report.json'}, " + ", ".join(map(str, plots)))


# The data commands and those about trained runs (recommend, export, update, versions, rollback, serve)
# register themselves.
from evolora.cli import data, recommend, trained  # noqa: E402, F401


def main() -> None:  # pragma: no cover - console entry
    sys.exit(app())


if __name__ == "__main__":  # pragma: no cover
    main()
