"""`python -m train.experiments.study` (`make study`): see train/experiments/study/run.py."""
import sys

from train.experiments.study.run import main

sys.exit(main())
