"""``python -m fmstore.cli``: the same as the ``fmstore`` command."""

from . import main

raise SystemExit(main())
