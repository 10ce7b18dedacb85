"""The contrastive objective (objective.py: CLIP, CyCLIP's regularisers, m²-Mix and V/L/VL-Mix on this rank's
features, gathered through train/core/distributed.py) and its diagnostics. The math: docs/METHODS.md §1–3."""
