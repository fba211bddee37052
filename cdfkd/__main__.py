"""``python -m cdfkd`` runs the command line."""

from cdfkd.cli import main

raise SystemExit(main())
