"""`python -m llmpy ...` is the `llmpy` command (also what torchrun -m llmpy runs)."""

import sys

from .cli import main

sys.exit(main())
