"""``python -m advkit.cli``: the command line (as ``python -m advkit``)."""

from advkit.cli import main

main()
