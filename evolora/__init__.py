"""evolora: continual adaptation of LLM-based recommender systems with LoRA adapters.

`evolora.run(config, **overrides)` runs an experiment; `evolora.Recommender.load(run_dir, method=...)`
gives a trained run's model for scores and recommendations (see `evolora/api.py`).
"""

import importlib
import logging
from typing import Any

__version__ = "0.1.0"
__all__ = ["Recommender", "report", "run"]

logging.getLogger("evolora").addHandler(logging.NullHandler())


def __getattr__(name: str) -> Any:
    # The API pulls in torch and transformers: imported on first use, so `import evolora` stays light.
    if name in __all__ or name == "api":
        api = importlib.import_module("evolora.api")
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'evolora' has no attribute {name!r}")
