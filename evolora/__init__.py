"""evolora: continual adaptation of LLM-based recommender systems with LoRA adapters."""

import logging

__version__ = "0.1.0"

logging.getLogger("evolora").addHandler(logging.NullHandler())
