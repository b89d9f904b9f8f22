"""`python -m csi` is the same as the `fusecsi` command."""

from csi.cli import main

raise SystemExit(main())
