"""`python -m evolora ...` (and `accelerate launch -m evolora run CONFIG`): the command-line interface."""

from evolora.cli import main

main()
