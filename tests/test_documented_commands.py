"""The documentation's commands work: every `evolora run configs/...` loads and validates with its `--set`s,
and every `evolora SUBCOMMAND --option` names a command and an option that exist.

A command in a results README or a config's comment is what a user copies to reproduce a table; a key renamed
since it was written would otherwise fail only when someone runs it (and a typo after hours of earlier
commands). Commands are read from fenced blocks of the top-level, benchmarks/ and docs/ Markdown files and
from the comments of configs/*.yaml; lines continued with a backslash are joined, `NAME=value` assignments of
the block are substituted, and a `for m in a b c; do ... done` loop gives one command per value.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from evolora.config import load_config

ROOT = Path(__file__).resolve().parent.parent
_ASSIGN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)=(.*)$")
_LOOP = re.compile(r"^for ([A-Za-z_][A-Za-z0-9_]*) in (.+); do$")


def _blocks(path: Path) -> list[list[str]]:
    """The shell lines of a document: fenced code blocks of Markdown, `#` comment runs of YAML."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[list[str]] = []
    if path.suffix == ".md":
        current: list[str] | None = None
        for line in lines:
            if line.lstrip().startswith("```"):
                if current is None:
                    current = []
                else:
                    blocks.append(current)
                    current = None
            elif current is not None:
                current.append(line)
    else:
        current = []
        for line in lines:
            if line.lstrip().startswith("#"):
                current.append(line.lstrip()[1:])
            elif current:
                blocks.append(current)
                current = []
        blocks.append(current)
    return blocks


def _joined(block: list[str]) -> list[str]:
    out: list[str] = []
    pending = ""
    for line in block:
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
        else:
            out.append((pending + line).strip())
            pending = ""
    return out


def _expand(text: str, env: dict[str, str]) -> str:
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: env.get(m.group(1), m.group(0)), text)


def _commands(path: Path) -> list[str]:
    """Each `evolora run` line of a document with its variables substituted (one per loop value)."""
    found: list[str] = []
    for block in _blocks(path):
        env: dict[str, str] = {}
        loop: tuple[str, list[str]] | None = None
        for line in _joined(block):
            if (m := _LOOP.match(line)) is not None:
                loop = (m.group(1), shlex.split(m.group(2)))
            elif line == "done":
                loop = None
            elif (m := _ASSIGN.match(line)) is not None and " " not in line.split("=", 1)[0]:
                env[m.group(1)] = " ".join(shlex.split(m.group(2)))
            elif "evolora run " in line:
                for value in loop[1] if loop else [None]:
                    found.append(_expand(line, env | ({loop[0]: value} if loop and value else {})))
    return found


def _documented() -> list[tuple[str, str]]:
    docs = [
        *sorted(ROOT.glob("*.md")),
        *sorted((ROOT / "benchmarks").glob("*.md")),
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "configs").glob("*.yaml")),
    ]
    out = []
    for path in docs:
        for command in _commands(path):
            out.append((f"{path.relative_to(ROOT)}: {command[:90]}", command))
    return out


DOCUMENTED = _documented()


def _run_arguments(command: str) -> tuple[str | None, list[str]]:
    """The config path and the `--set` values of an `evolora run` command (None for a placeholder config)."""
    words = shlex.split(command, comments=True)
    words = words[words.index("run") + 1 :]
    config, sets = None, []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "--set":
            sets.append(words[i + 1])
            i += 2
            continue
        if word in ("--jobs", "--seed"):
            i += 2
            continue
        if not word.startswith("-") and config is None:
            config = word
        i += 1
    return (config if config and config.startswith("configs/") else None), sets


def test_the_documentation_has_run_commands() -> None:
    # The extraction itself: loops, continuations and variables found where the results READMEs use them.
    commands = [c for _, c in DOCUMENTED]
    assert len(commands) >= 60
    assert any("name=conventional-ctr-ml100k-two_tower" in c for c in commands)  # a for-loop value
    assert any("name=reclora-ml100k-recent" in c and "seeds=[0,1,2]" in c for c in commands)  # $S expanded
    assert not any("$" in c for c in commands if "evolora run configs/" in c)


@pytest.mark.parametrize("command", [c for _, c in DOCUMENTED], ids=[i for i, _ in DOCUMENTED])
def test_documented_run_command_validates(command: str) -> None:
    config, sets = _run_arguments(command)
    if config is None:
        pytest.skip("a placeholder config (CONFIG.yaml, the user's own file)")
    assert (ROOT / config).is_file(), f"{config} is not shipped"
    load_config(ROOT / config, sets)


def _cli_lines() -> list[tuple[str, str]]:
    """Every `evolora SUBCOMMAND ...` the documentation shows: lines of code blocks and config comments that
    start with it (a `;` starts another), and inline code spans."""
    docs = [
        *sorted(ROOT.glob("*.md")),
        *sorted((ROOT / "docs").rglob("*.md")),
        *sorted((ROOT / "configs").glob("*.yaml")),
    ]
    out = []
    for path in docs:
        parts = [
            part.strip() for block in _blocks(path) for line in _joined(block) for part in line.split(";")
        ]
        if path.suffix == ".md":
            parts += re.findall(r"`(evolora [^`]+)`", path.read_text(encoding="utf-8"))
        out += [
            (str(path.relative_to(ROOT)), part[len("evolora ") :])
            for part in parts
            if part.startswith("evolora ")
        ]
    return out


def _words(text: str) -> list[str]:
    """The words of one command, up to a pipe or redirect; `[...]` marks optional words in usage lines."""
    try:
        words = shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote: whitespace words are enough for option names
        words = text.split()
    kept = []
    for i, word in enumerate(words):
        following = words[i + 1] if i + 1 < len(words) else ""
        if word == "|" and following.startswith("-"):
            continue  # a usage line's "--user U | --history A,B": either option
        if word in ("|", "&&", ">", ">>", "2>&1"):
            break
        kept.append(word.strip("[]"))
    return kept


def test_documented_cli_commands_and_options_exist() -> None:
    from typer.main import get_command

    from evolora.cli import app

    cli = get_command(app)
    problems, checked = [], 0
    for where, text in _cli_lines():
        words = _words(text)
        command = cli.commands.get(words[0]) if words else None  # type: ignore[attr-defined]
        if command is None:
            problems.append(f"{where}: no command `evolora {text}`")
            continue
        rest = words[1:]
        if hasattr(command, "commands") and rest and rest[0] in command.commands:
            command, rest = command.commands[rest[0]], rest[1:]
        known = {"--help"} | {o for p in command.params for o in (*p.opts, *p.secondary_opts)}
        for word in rest:
            option = word.split("=", 1)[0]
            if re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*", option):
                checked += 1
                if option not in known:
                    problems.append(f"{where}: `evolora {words[0]}` has no option {option}")
    assert checked >= 50
    assert not problems, "\n".join(problems)
