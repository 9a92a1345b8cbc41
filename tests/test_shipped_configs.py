"""Every config shipped in configs/ (and so in the package, through evolora/configs) loads and validates:
a typo or a removed key in one of them would otherwise surface only when someone runs it for hours."""

from __future__ import annotations

from pathlib import Path

import pytest

from evolora.config import load_config

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 10


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_shipped_config_loads(path: Path) -> None:
    cfg = load_config(str(path), [])
    assert cfg.name and cfg.strategies and cfg.seeds


def test_every_shipped_config_is_package_data() -> None:
    """An installed evolora (a wheel, an sdist) holds the configs only as package data: pyproject's patterns
    must name every file of evolora/configs (a config added in a new folder would be left out silently)."""
    import tomllib
    from pathlib import PurePosixPath

    root = Path(__file__).resolve().parent.parent
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = root / "evolora"
    files = [f.relative_to(package).as_posix() for f in (package / "configs").rglob("*") if f.is_file()]
    assert len(files) >= len(CONFIGS) + 2  # the accelerate configs too

    def installed(file: str) -> bool:  # setuptools' glob: `*` stays within a folder (fnmatch's crosses `/`)
        parts = PurePosixPath(file).parts
        return any(
            len(parts) == len(PurePosixPath(p).parts) and PurePosixPath(file).match(p) for p in patterns
        )

    patterns = patterns["evolora"]
    assert not installed("configs/more/x.yaml")  # (a config in a new folder is left out, so is said)
    left_out = [f for f in files if not installed(f)]
    assert not left_out, f"not installed with evolora: {left_out}"
    from evolora.parallel import ACCELERATE_CONFIGS  # where errors send a launch

    assert (ACCELERATE_CONFIGS / "ddp.yaml").is_file() and (ACCELERATE_CONFIGS / "fsdp.yaml").is_file()


def test_a_shipped_config_is_run_by_its_name_from_anywhere(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from typer.testing import CliRunner

    from evolora.cli import app
    from evolora.config import SHIPPED_CONFIGS, shipped_config
    from evolora.errors import ConfigError

    monkeypatch.chdir(tmp_path)  # no configs/ here, as for an installed evolora
    assert shipped_config("deploy-ml100k") == shipped_config("deploy-ml100k.yaml")
    assert shipped_config("deploy-ml100k") == SHIPPED_CONFIGS / "deploy-ml100k.yaml"
    assert shipped_config("configs/deploy-ml100k.yaml") is None  # a path is the user's, as given
    assert shipped_config("./deploy-ml100k") is None
    (tmp_path / "deploy-ml100k.yaml").write_text("name: mine\n")
    # a file of that name here is theirs, with its suffix or without
    assert shipped_config("deploy-ml100k.yaml") is None and shipped_config("deploy-ml100k") is None
    with pytest.raises(ConfigError, match=r"not found: deploy-ml100k \(did you mean deploy-ml100k\.yaml\?\)"):
        load_config("deploy-ml100k")
    # A path to where the README's configs/ would be says to give the name; a name of none lists them.
    with pytest.raises(ConfigError, match=r"ships a config of that name: give `quickstart` alone"):
        load_config("configs/quickstart.yaml")
    with pytest.raises(ConfigError, match=r"shipped configs, given by name: .*deploy-ml100k.*quickstart"):
        load_config("quickstrat")
    # `evolora run NAME`: the shipped file (a bad override shows which file it read, before any training)
    result = CliRunner().invoke(app, ["run", "single-split-ml100k", "--set", "train.epochs=0"])
    assert result.exit_code == 2, result.output
    assert "running evolora's shipped config single-split-ml100k" in result.output
    assert "train.epochs" in result.output and not (tmp_path / "runs").exists()


def test_the_extras_errors_name_are_declared_and_the_version_is_printed() -> None:
    import subprocess
    import sys
    import tomllib

    import evolora

    root = Path(__file__).resolve().parent.parent
    extras = tomllib.loads((root / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert extras["qlora"] == ["bitsandbytes"] and extras["mlflow"][0].startswith("mlflow")
    done = subprocess.run(
        [sys.executable, "-m", "evolora", "--version"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and done.stdout == f"evolora {evolora.__version__}\n", done
    # the one pyproject.toml declares (an installed package's metadata), kept in step by hand
    assert tomllib.loads((root / "pyproject.toml").read_text())["project"]["version"] == evolora.__version__
