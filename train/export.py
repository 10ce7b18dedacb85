"""`python -m train.export RUN_OR_CHECKPOINT [--out DIR]`: the entry point; the code is train/core/export.py."""
import sys

from train.core.export import main

if __name__ == "__main__":
    sys.exit(main())
