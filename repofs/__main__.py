"""``python -m repofs``: the same as the ``repofs`` command."""

from repofs.cli import main

main()
