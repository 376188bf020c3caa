"""``python -m genailab``: the command line."""

from genailab.cli import main

main()
