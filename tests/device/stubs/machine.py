# Stand-in for the Pico's `machine` module on the MicroPython Unix port.
# Output pins write their changes to the file named by STUB_LOG; an input
# pin with PULL_UP reads as pressed (0) STUB_PRESSES times, once every few
# reads, and then raises KeyboardInterrupt, as a user pressing Ctrl-C would;
# with STUB_HOLD_READS=n each press is held down for n more reads.

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
        self._held = 0  # reads left of a press held down (STUB_HOLD_READS)

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
        if self._held > 0:
            self._held -= 1
            return 0
        if self._reads % 3:
            return 1
        if self._presses <= 0:
            raise KeyboardInterrupt
        self._presses -= 1
        _log(f"pin {self.id} pressed")
        self._held = int(os.getenv("STUB_HOLD_READS") or "0")
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


class I2S:
    # Stand-in for machine.I2S. TX writes to the file named by STUB_I2S_OUT
    # (appending) and blocks, like the DMA, while more than `ibuf` bytes wait
    # to be "played" at `rate`; RX reads the file named by STUB_I2S_IN in real
    # time (a read returns when that much audio would have been recorded) and
    # returns 0 at its end.
    TX = 0
    RX = 1
    MONO = 0
    STEREO = 1

    def __init__(self, id, sck=None, ws=None, sd=None, mck=None, mode=0, bits=16,
                 format=0, rate=16000, ibuf=8192):
        import time

        self._time = time
        self.mode = mode
        self.rate = rate
        self.ibuf = ibuf
        self.frame = (bits // 8) * (2 if format == I2S.STEREO else 1)
        name = os.getenv("STUB_I2S_OUT" if mode == I2S.TX else "STUB_I2S_IN")
        self._f = open(name, "ab" if mode == I2S.TX else "rb")
        self._until = time.ticks_ms()
        self._start = None
        self._read = 0

    def _ms(self, n):
        return n * 1000 // (self.rate * self.frame)

    def write(self, buf):
        t = self._time
        n = len(buf)
        self._f.write(buf)
        now = t.ticks_ms()
        if t.ticks_diff(self._until, now) < 0:
            self._until = now
        self._until = t.ticks_add(self._until, self._ms(n))
        wait = t.ticks_diff(self._until, now) - self._ms(self.ibuf)
        if wait > 0:
            t.sleep_ms(wait)
        return n

    def readinto(self, buf):
        t = self._time
        if self._start is None:
            self._start = t.ticks_ms()
        n = self._f.readinto(buf)
        if not n:
            return 0
        self._read += n
        wait = self._ms(self._read) - t.ticks_diff(t.ticks_ms(), self._start)
        if wait > 0:
            t.sleep_ms(wait)
        return n

    def deinit(self):
        self._f.close()
