# Stand-in for the Pico W's `network` module on the MicroPython Unix port:
# the VM already has the host's networking, so the "Wi-Fi" connects at once.
# It records what was asked of it in the file named by STUB_LOG, if set.

import os

STA_IF = 0
AP_IF = 1
STAT_IDLE = 0
STAT_CONNECTING = 1
STAT_GOT_IP = 3


def _log(line):
    path = os.getenv("STUB_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


class WLAN:
    def __init__(self, interface=STA_IF):
        self._active = False
        self._connected = False
        self._ssid = None

    def active(self, value=None):
        if value is None:
            return self._active
        self._active = bool(value)
        _log(f"wlan active {int(self._active)}")
        return None

    def connect(self, ssid=None, key=None, **kw):
        if not self._active:
            raise OSError("WLAN not active")
        self._ssid = ssid
        self._connected = True
        _log(f"wlan connect {ssid}")  # never the key

    def disconnect(self):
        self._connected = False

    def isconnected(self):
        return self._connected

    def status(self, param=None):
        return STAT_GOT_IP if self._connected else STAT_IDLE

    def ifconfig(self, *args):
        return ("127.0.0.1", "255.0.0.0", "127.0.0.1", "127.0.0.1")

    def config(self, *args, **kw):
        if args and args[0] == "ssid":
            return self._ssid
        return None
