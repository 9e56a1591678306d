"""``python -m covsvd``: the command line (:mod:`covsvd.cli.main`)."""

from .cli.main import main

raise SystemExit(main())
