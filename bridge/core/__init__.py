"""The runtime core: a request's lifecycle from MQTT to the API and back.

Lives here: the protocol (messages, topics, errors), the MQTT link, the
upstream client and the folding of its stream, chunking, the crash journal,
the configuration, and the plugin interface. The core imports nothing from
`bridge.plugins`, `bridge.ops`, `bridge.dev` or `bridge.app`; plugins reach it
only through `bridge.core.plugin`.
"""
