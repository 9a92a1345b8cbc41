"""`finetune`: one evolving LoRA, continued from the previous stage's weights on the new stage only.

LSAT's "Fine-tuning" and PESO's "Single evolving LoRA" (PESO with lambda = 0). Cheap and current, but nothing
holds it to what it knew: the method the regularised strategies try to improve on.
"""

from __future__ import annotations

from evolora.continual.base import Strategy, StrategyOptions


class Finetune(Strategy[StrategyOptions]):
    name = "finetune"
    needs_lora = False
