"""``python -m creditguard``: the command-line interface."""

from creditguard.cli.main import main

raise SystemExit(main())
