"""Evaluation of CLIP-style models: zero-shot, retrieval, CyCLIP consistency, embedding geometry,
calibration and distribution shift (docs/METHODS.md §4). CLI: ``python -m train.evaluate``.

Modules: config.py (the schema, torch-free), data.py (dataset folders, model loading, encoding), core.py
(``evaluate``, ``headline``), metrics.py (the formulas), corruptions.py (the shifted copies), periodic.py
(the light evaluation the trainer runs during training), compare.py and report.py (tables and plots).
Nothing is imported here, so ``train.evaluate.config`` loads without torch."""
