"""SumLoRA: the earlier stages' adapters, normalised and frozen, summed under a new trainable adapter.

PESO's "SumLoRA" family (spec §5): W_t = W_0 + sum_{i<t} s * B^_i A^_i + s * B_t A_t with A^ = A / ||A||_F,
B^ = B / ||B||_F and the magnitudes fixed at 1 (times the LoRA scaling s), as in PESO's code. Variants through
`past` (all / latest) and `init` (inherit / fresh).
"""

from __future__ import annotations

from evolora.continual.cumulative import CumulativeLora, CumulativeOptions


class SumLora(CumulativeLora[CumulativeOptions]):
    name = "sumlora"
