# The topic names of the bridge's protocol (docs/protocol.md), for one
# device, as bytes: what umqtt.simple sends and hands to the callback. Every
# topic the device library uses comes from here, as the bridge's come from
# bridge/core/topics.py's Topics.


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

    def audio_filter(self):
        # protocol v2 "Voice": the spoken replies
        return self.base + b"audio/+"

    def listen(self, rid):
        # protocol v2 "Voice": an utterance, the prompt of request rid
        return self.base + b"listen/" + rid.encode()

    def state(self):
        return self.base + b"state"

    def status(self):
        return self.prefix + b"bridge/status"

    # protocol v2, "Tools" (picollm/tools.py)
    def tools(self):
        return self.base + b"tools"

    def tools_ack(self):
        return self.base + b"tools/ack"

    def presence(self):
        return self.base + b"status"

    def call(self):
        return self.base + b"call"

    def result(self):
        return self.base + b"result"
    # Pictures (protocol v2, picollm.image)
    def upload(self, rid):
        return self.base + b"upload/" + rid.encode()

    def image(self, rid):
        return self.base + b"image/" + rid.encode()

    def image_filter(self):
        return self.base + b"image/+"
