# A pure tool device: the Pico's LED as a lamp and its temperature sensor,
# offered to the LLM through the bridge (protocol v2, "Tools"). It never
# asks anything itself: a device that the bridge's policy grants "lamp/*"
# asks "turn the lamp on" with use_tools=True, and the bridge calls this
# device. Deploy it as main.py with a config.json whose device_id is the
# lamp's (e.g. "lamp"); "led" in config.json's gpio names the pin (default
# "LED", the Pico W's on-board LED).

import sys
import time

import asyncio
from picollm import Chat, load_config


def wifi_up(cfg):
    try:
        import network
    except ImportError:
        return  # no Wi-Fi module: a wired board or the Unix port
    w = cfg.get("wifi") or {}
    wlan = network.WLAN(network.STA_IF)
    wlan.active(True)
    if not wlan.isconnected():
        wlan.connect(w.get("ssid"), w.get("password"))
        start = time.ticks_ms()
        while not wlan.isconnected():
            if time.ticks_diff(time.ticks_ms(), start) > cfg.get("wifi_timeout_ms", 20000):
                raise OSError("Wi-Fi: could not join %s" % w.get("ssid"))
            time.sleep_ms(200)


def lamp(chat, cfg):
    from machine import ADC, Pin

    led = Pin((cfg.get("gpio") or {}).get("led", "LED"), Pin.OUT)
    sensor = ADC(4)  # the RP2040/RP2350's internal temperature sensor

    @chat.tool("set_led", "Turn the lamp on or off",
               {"type": "object", "properties": {"on": {"type": "boolean"}}, "required": ["on"]},
               timeout_ms=3000)
    def set_led(on):
        if not isinstance(on, bool):
            raise ValueError("on must be true or false")
        led.value(1 if on else 0)
        print("lamp", "on" if on else "off")
        return {"on": on}

    @chat.tool("read_temperature", "The temperature at the lamp, in degrees Celsius")
    def read_temperature():
        volts = sensor.read_u16() * 3.3 / 65535
        return {"celsius": round(27 - (volts - 0.706) / 0.001721, 1)}


def run(path="config.json"):
    cfg = load_config(path)
    wifi_up(cfg)
    chat = Chat(cfg)
    lamp(chat, cfg)
    print("lamp: serving tools as", cfg["device_id"])
    try:
        asyncio.run(chat.serve(cfg.get("serve_ms")))
    except KeyboardInterrupt:
        print("stopped")
    asyncio.run(chat.close())


if __name__ == "__main__":
    run(sys.argv[1] if len(sys.argv) > 1 else "config.json")
