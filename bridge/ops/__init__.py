"""Operator tools: provisioning devices and the broker, TLS certificates, deploying to a Pico.

Used by the `llm-bridge device …` and `llm-bridge broker …` commands. May
import `bridge.core` (protocol, settings) and a plugin's stored data (the
policy's counters), never `bridge.app` or `bridge.dev`; only the CLI and the
developer tools import these.
"""
