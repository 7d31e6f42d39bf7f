"""`python -m bridge` is `llm-bridge`."""

from bridge.cli import main

raise SystemExit(main())
