"""``python benchmarks/active_learning.py [--full] [...]``:
the same as ``marginalize bench active-learning [...]``.

Results go to benchmarks/results/ (see ``marginalize bench active-learning --help``).
"""

import sys

from marginalize.benchmarks import build_parser, run_parsed

if __name__ == "__main__":
    argv = ["active-learning", *sys.argv[1:]]
    args = build_parser("python benchmarks/active_learning.py").parse_args(argv)
    sys.exit(run_parsed(args, ["python", *sys.argv]))
