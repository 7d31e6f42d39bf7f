"""The runtime core: a request's lifecycle from MQTT to the API and back.

Lives here: the protocol (messages, topics, errors), the MQTT link, the
upstream client and the folding of its stream, chunking, the crash journal,
the configuration, and the plugin interface. The core imports only
`bridge.core`: nothing from `bridge.plugins`, `bridge.ops`, `bridge.dev`,
`bridge.app` or `bridge.cli`. Plugins see it through `bridge.core.plugin`
(Plugin, Host) and the job, protocol, topics, errors and settings they are handed.
"""
