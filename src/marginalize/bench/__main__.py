"""``python -m marginalize.bench uci|classification|active-learning [--full] [...]``."""

import sys

from marginalize.bench import main

if __name__ == "__main__":
    sys.exit(main())
