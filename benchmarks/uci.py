"""``python benchmarks/uci.py [--full] [...]``: the same as ``marginalize bench uci [...]``.

Results go to benchmarks/results/ (see ``marginalize bench uci --help``).
"""

import sys

from marginalize.benchmarks import build_parser, run_parsed

if __name__ == "__main__":
    argv = ["uci", *sys.argv[1:]]
    args = build_parser("python benchmarks/uci.py").parse_args(argv)
    sys.exit(run_parsed(args, ["python", *sys.argv]))
