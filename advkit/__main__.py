"""``python -m advkit`` (and ``torchrun ... -m advkit train``): the command line."""

from advkit.cli import main

main()
