"""Where the repository's own folders are, written once (modules sit at different depths of the tree)."""
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The repository root: pyproject.toml, configs/, data/, runs/ live here."""
CONFIGS = REPO_ROOT / "configs"
"""configs/: YAML run configs, model/ (open_clip model configs), demo/, study/, scale/."""
