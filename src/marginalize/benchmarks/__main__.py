"""``python -m marginalize.benchmarks uci|classification|active-learning [--full] [...]``."""

import sys

from marginalize.benchmarks import main

if __name__ == "__main__":
    sys.exit(main())
