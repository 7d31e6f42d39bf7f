"""`python -m bench.baseline`: run the naive bridge, configured like ours by environment."""

from bench.baseline.bridge import main

raise SystemExit(main())
