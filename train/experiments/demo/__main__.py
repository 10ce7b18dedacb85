"""`python -m train.experiments.demo` (`make demo`): see train/experiments/demo/run.py."""
import sys

from common.cli import run_entry_point
from train.experiments.demo.run import main

sys.exit(run_entry_point(main, sys.argv[1:]))
