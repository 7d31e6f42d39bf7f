# The topic names of the bridge's protocol (docs/protocol.md), for one
# device, as bytes: what umqtt.simple sends and hands to the callback. Every
# topic the device library uses comes from here, as the bridge's come from
# bridge/protocol.py's Topics.


class Topics:
    def __init__(self, prefix, device_id):
        self.prefix = prefix.encode() + b"/"
        self.base = self.prefix + device_id.encode() + b"/"

    def req(self):
        return self.base + b"req"

    def cancel(self):
        return self.base + b"cancel"

    def res(self, rid):
        return self.base + b"res/" + rid.encode()

    def res_filter(self):
        return self.base + b"res/+"

    def state(self):
        return self.base + b"state"

    def status(self):
        return self.prefix + b"bridge/status"

    # Pictures (protocol v2, picollm.image)
    def upload(self, rid):
        return self.base + b"upload/" + rid.encode()

    def image(self, rid):
        return self.base + b"image/" + rid.encode()

    def image_filter(self):
        return self.base + b"image/+"
