"""``python benchmarks/classification.py [--full] [...]``:
the same as ``marginalize bench classification [...]``.

Results go to benchmarks/results/ (see ``marginalize bench classification --help``).
"""

import sys

from marginalize.benchmarks import build_parser, run_parsed

if __name__ == "__main__":
    argv = ["classification", *sys.argv[1:]]
    args = build_parser("python benchmarks/classification.py").parse_args(argv)
    sys.exit(run_parsed(args, ["python", *sys.argv]))
