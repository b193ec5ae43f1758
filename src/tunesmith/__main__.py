"""`python -m tunesmith ...`: what `accelerate launch -m tunesmith train CONFIG` starts in each process."""

import sys

from .cli import main

sys.exit(main())
