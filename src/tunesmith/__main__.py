"""`python -m tunesmith ...`: what `accelerate launch -m tunesmith train CONFIG` starts in each process."""

from .cli import run

run()
