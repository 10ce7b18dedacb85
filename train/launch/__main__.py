"""`python -m train.launch --config FILE [--nodes N ...] [key=value ...]`: submit with submitit (executor.py)."""
import sys

from train.launch.executor import main

sys.exit(main())
