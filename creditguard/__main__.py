"""``python -m creditguard``: the command-line interface."""

from ._cli import main

raise SystemExit(main())
