"""`python -m rd_keras.bench ...`: see rd_keras/bench/cli.py."""

import sys

from rd_keras.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
