"""``python -m repofs``: the same as the ``repofs`` command."""

from repofs.cli.main import main

main()
