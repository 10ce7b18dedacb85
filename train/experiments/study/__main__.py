"""`python -m train.experiments.study` (`make study`): see train/experiments/study/run.py."""
import sys

from common.cli import run_entry_point
from train.experiments.study.run import main

sys.exit(run_entry_point(main, sys.argv[1:]))
