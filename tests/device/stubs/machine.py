# Stand-in for the Pico's `machine` module on the MicroPython Unix port.
# Output pins write their changes to the file named by STUB_LOG; an input
# pin with PULL_UP reads as pressed (0) STUB_PRESSES times, once every few
# reads, and then raises KeyboardInterrupt, as a user pressing Ctrl-C would.

import os


def _log(line):
    path = os.getenv("STUB_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


class Pin:
    IN = 0
    OUT = 1
    PULL_UP = 1
    PULL_DOWN = 2
    IRQ_FALLING = 4
    IRQ_RISING = 8

    def __init__(self, id, mode=-1, pull=-1, value=None):
        if os.getenv("STUB_NO_PINS"):
            raise ValueError("invalid pin")
        self.id = id
        self.mode = mode
        self._value = 0 if value is None else value
        self._reads = 0
        self._presses = int(os.getenv("STUB_PRESSES") or "0")

    def value(self, v=None):
        if v is None:
            if self.mode == Pin.IN:
                return self._read()
            return self._value
        self._value = 1 if v else 0
        _log(f"pin {self.id} {self._value}")
        return None

    def _read(self):
        self._reads += 1
        if self._reads % 3:
            return 1
        if self._presses <= 0:
            raise KeyboardInterrupt
        self._presses -= 1
        _log(f"pin {self.id} pressed")
        return 0

    def on(self):
        self.value(1)

    def off(self):
        self.value(0)

    def toggle(self):
        self.value(0 if self._value else 1)

    __call__ = value


def unique_id():
    return b"\x00\x11\x22\x33\x44\x55\x66\x77"


def reset():
    raise SystemExit


class ADC:
    # The temperature sensor (ADC 4) reads STUB_ADC (default 14000: about 27.6 C).
    def __init__(self, id):
        self.id = id

    def read_u16(self):
        return int(os.getenv("STUB_ADC") or "14000")
