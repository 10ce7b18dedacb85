"""`python -m train.experiments.demo` (`make demo`): see train/experiments/demo/run.py."""
import sys

from train.experiments.demo.run import main

sys.exit(main())
