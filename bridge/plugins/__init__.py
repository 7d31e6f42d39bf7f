"""Plugins: what the bridge does around a request, through the core's plugin interface.

Per-device policy, retained state, Home Assistant discovery, Prometheus
metrics. A plugin may import `bridge.core` (and another plugin it builds on);
the core never imports a plugin. `bridge.app` chooses and wires them.
"""
