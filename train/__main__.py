"""`python -m train --config FILE [key=value ...]`: one training run under any launcher."""
import sys

from train.trainer import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:])["exit_code"])
