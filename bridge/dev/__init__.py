"""Developer tools: the mock LLM, the demo, and Python clients of the protocol.

They sit on top: they may import anything but `bridge.cli`; nothing but the
CLI imports them.
"""
