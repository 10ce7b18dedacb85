"""Process-wide test settings. Set before anything imports img2dataset, torch or DeepSpeed."""
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# albumentations (via img2dataset) contacts PyPI at import unless this is set.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# DeepSpeed's shm comm op JIT-compiles once (~45 s); a stable cache pays that once per machine.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))
# Two cores: multi-rank tests oversubscribe without this.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_MODE", "disabled")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def trained(tmp_path_factory):
    """(dataset folder, model, eval transform, tokenizer, loss log): tests/harness/eval_fixtures.py's tiny CLIP,
    trained once per session for the evaluation tests."""
    from tests.harness.eval_fixtures import train_tiny_clip

    return train_tiny_clip(tmp_path_factory.mktemp("eval"))


@pytest.fixture(autouse=True)
def _restore_environment():
    """Put os.environ back after every test. Launcher discovery exports what it finds (its job), and a
    SLURM rendezvous left behind by one test would reach every later test's training subprocesses."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
