"""``python -m bdaudit.cli``: the same entry point as the ``bdaudit`` script."""

from bdaudit.cli.entry import main

main()
