"""Developer tools: the mock LLM, the demo, and Python clients of the protocol.

They sit above everything else: they may import `bridge.core`, `bridge.ops`
and `bridge.app`; nothing below imports them.
"""
