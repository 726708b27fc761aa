"""`python -m unialign` runs the command line (used by torchrun launches)."""

from .cli import main

main()
