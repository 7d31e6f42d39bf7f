# Example program for the Raspberry Pi Pico 2W: join Wi-Fi, ask the LLM,
# print the reply as it streams. The mode ("mqtt" through the bridge, or
# "direct" over HTTPS) comes from config.json only.
#
# Optional hardware: a push button between gpio.button and GND (asks the next
# prompt on each press) and an LED on gpio.led (lit while a reply streams;
# "LED" is the Pico W's on-board LED). Without them the prompts are asked
# once, in turn. Ctrl-C cancels the reply being streamed. With "use_tools":
# true in config.json the model may use the tools the bridge grants this
# device (a wall switch asking "turn the lamp on": examples/lamp/main.py).
# once, in turn. Ctrl-C cancels the reply being streamed.
#
# Push-to-talk (MQTT mode, config "voice": {"enabled": true, ...}): an I2S
# amplifier (e.g. MAX98357A) on voice.speaker's pins, an I2S microphone (e.g.
# INMP441) on voice.mic's, and a button on voice.talk_button. Hold the button
# and speak; on release the bridge transcribes, asks, and the answer plays.

import sys
import time

import asyncio
from picollm import Chat, LLMError, load_config


def wifi_up(cfg):
    try:
        import network
    except ImportError:
        return None  # no Wi-Fi module: a wired board or the Unix port
    w = cfg.get("wifi") or {}
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        print("Wi-Fi: joining", w.get("ssid"))
        wlan.connect(w.get("ssid"), w.get("password"))
        start = time.ticks_ms()
        while not wlan.isconnected():
            if time.ticks_diff(time.ticks_ms(), start) > cfg.get("wifi_timeout_ms", 20000):
                raise OSError("Wi-Fi: could not join %s" % w.get("ssid"))
            time.sleep_ms(200)
    print("Wi-Fi up, IP", wlan.ifconfig()[0])
    return wlan


def gpio(cfg):
    g = cfg.get("gpio") or {}
    led = button = None
    try:
        from machine import Pin

        if g.get("led") is not None:
            led = Pin(g["led"], Pin.OUT)
        if g.get("button") is not None:
            button = Pin(g["button"], Pin.IN, Pin.PULL_UP)
    except (ImportError, AttributeError, TypeError, ValueError, OSError) as e:
        print("no GPIO (%s): running without button and LED" % (e,))
        led = button = None
    return led, button


def show_tool(m):
    # With "use_tools": true (protocol v2) the bridge may call tools (another
    # device's, as its policy grants) before the answer: say so.
    if "tool_call" in m:
        c = m["tool_call"]
        print("[calling %s on %s]" % (c.get("name"), c.get("device")))
    elif "tool_result" in m:
        print("[%s]" % ("done" if m["tool_result"].get("ok") else "failed"))


async def ask(chat, prompt, led):
    print(">", prompt)
    if led:
        led.value(1)
    try:
        opts = {"use_tools": True} if chat.config.get("use_tools") else {}
        reply = chat.stream(prompt, **opts)
        async for piece in reply:
            print(piece, end="")
        print()
        usage = reply.usage or {}
        print("[%s, %s tokens]" % (reply.finish_reason, usage.get("total_tokens", "?")))
    except LLMError as e:
        print()
        print("[error]", e)
    finally:
        if led:
            led.value(0)


async def pressed(button):
    while button.value():
        await asyncio.sleep_ms(20)
    while not button.value():  # wait for the release
        await asyncio.sleep_ms(20)


def voice_io(cfg):
    # The I2S speaker and microphone of config "voice", or None when off.
    v = cfg.get("voice") or {}
    if not v.get("enabled"):
        return None
    from machine import I2S, Pin

    rate = v.get("rate", 16000)

    def i2s(pins, mode):
        return I2S(pins["id"], sck=Pin(pins["sck"]), ws=Pin(pins["ws"]), sd=Pin(pins["sd"]),
                   mode=mode, bits=16, format=I2S.MONO, rate=rate, ibuf=v.get("ibuf", 8192))

    from picollm.voice import Speaker

    speaker = Speaker(i2s(v["speaker"], I2S.TX), buffer=v.get("buffer", 20480))
    mic = i2s(v["mic"], I2S.RX)
    talk = Pin(v["talk_button"], Pin.IN, Pin.PULL_UP)
    return speaker, mic, talk


async def push_to_talk(chat, cfg, led, mic, talk):
    v = cfg["voice"]
    rate = v.get("rate", 16000)
    print("hold the talk button and speak")
    while True:
        while talk.value():  # released (pulled up): wait for a press
            await asyncio.sleep_ms(20)
        if led:
            led.value(1)
        try:
            heard, answer = await chat.listen(
                mic, rate=rate, until=lambda: talk.value() == 1,
                silence_ms=v.get("silence_ms", 0), max_ms=v.get("max_ms", 10000),
                speak={"rate": rate})
            print("you:", heard)
            print("llm:", answer)
        except LLMError as e:
            print("[error]", e)
        finally:
            if led:
                led.value(0)


async def main(chat, cfg, led, button):
    prompts = cfg.get("prompts") or ["Why is the sky blue?"]
    if button is None:
        for prompt in prompts:
            await ask(chat, prompt, led)
        return
    print("press the button to ask")
    i = 0
    while True:
        await pressed(button)
        await ask(chat, prompts[i % len(prompts)], led)
        i += 1


def run(path="config.json"):
    cfg = load_config(path)
    print("picollm: mode", cfg["mode"])
    wifi_up(cfg)
    led, button = gpio(cfg)
    chat = Chat(cfg)
    chat.on_tool = show_tool
    voice = voice_io(cfg)
    try:
        if voice is not None:
            chat.speaker = voice[0]
            asyncio.run(push_to_talk(chat, cfg, led, voice[1], voice[2]))
        else:
            asyncio.run(main(chat, cfg, led, button))
    except KeyboardInterrupt:
        chat.interrupt()  # tell the bridge (or the API) to stop
        print()
        print("stopped")
    asyncio.run(chat.close())


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "config.json")
