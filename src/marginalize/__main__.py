"""``python -m marginalize ...`` (also ``torchrun --nproc-per-node=K -m marginalize fit ...``)."""

import sys

from marginalize.cli import main

sys.exit(main())
