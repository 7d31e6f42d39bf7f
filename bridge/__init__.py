"""llm-mqtt-bridge: `core` serves the protocol, `plugins` act around each request,
`app` wires them, `cli` is the command; `ops` and `dev` are tools on top
(docs/architecture.md, checked by tests/unit/test_import_rules.py)."""
