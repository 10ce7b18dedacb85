"""Experiments built on the trainer's core, never imported by it: the demo (`make demo`), the study
(`make study`) and claims.py, the one registry of claimed effects and the one verdict rule both use."""
