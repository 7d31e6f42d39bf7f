"""A naive MQTT-LLM bridge, written the way public ones are, for the benchmark to compare with.

Why it exists: "faster" only means something against what a user would
otherwise write. This is that program, written honestly: the official
`openai` SDK (AsyncOpenAI, streaming), paho-mqtt with its own network thread
(`loop_start`), one asyncio task per request, one QoS 1 publish per delta,
speaking protocol v1's topics and messages so the same load generator
measures it. It leaves the libraries at their defaults, as such projects do.
It is not part of the product.
"""
