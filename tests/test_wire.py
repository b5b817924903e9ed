"""The codec alone: request validation, reply and event encoding, client-side decoding."""

import json

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from p2pchat import wire
from p2pchat.wire import Code, Event, Reply, WireError, decode_frame, decode_request


def refused(test, line: bytes) -> WireError:
    with test.assertRaises(WireError) as cm:
        decode_request(line)
    return cm.exception


class DecodeRequestTests(SynchronousTestCase):
    def test_valid(self):
        """A well-formed request decodes to its id, op and the schema's arguments only."""
        r = decode_request(b'{"id":3,"op":"send","to":"bob","msg_id":"m","envelope":"e","extra":1}')
        self.assertEqual((r.id, r.op, dict(r.args)), (3, "send", {"to": "bob", "msg_id": "m", "envelope": "e"}))

    def test_background(self):
        """"background": true marks a request the client makes on its own; anything else is not."""
        self.assertTrue(decode_request(b'{"id":1,"op":"who","background":true}').background)
        for other in (b'', b',"background":false', b',"background":1', b',"background":"true"'):
            self.assertFalse(decode_request(b'{"id":1,"op":"who"' + other + b'}').background, other)

    def test_crlf(self):
        """A trailing carriage return is ignored."""
        self.assertEqual(decode_request(b'{"id":"a","op":"who"}\r').op, "who")

    def test_bad_json(self):
        """Text that is not a JSON object is bad_json, with no id."""
        for line in [b"not json", b"[1,2]", b'"str"', b"{", b"NaN", b'{"id":1,"op":"whosince","seconds":NaN}']:
            e = refused(self, line)
            self.assertEqual((e.code, e.request_id), (Code.BAD_JSON, None), line)

    def test_bad_utf8(self):
        """Bytes that are not UTF-8 are bad_utf8."""
        self.assertEqual(refused(self, b'{"id":1,"op":"\xff"}').code, Code.BAD_UTF8)

    def test_deep_nesting(self):
        """Deeply nested JSON is refused, not a RecursionError."""
        self.assertEqual(refused(self, b"[" * 50000 + b"]" * 50000).code, Code.BAD_JSON)

    def test_bad_id(self):
        """Ids must be short strings or non-negative integers below 2**53; booleans are not integers."""
        for bad in [None, True, -1, 2**53, "", "x" * 65, 1.5, [1]]:
            e = refused(self, json.dumps({"id": bad, "op": "who"}).encode())
            self.assertEqual((e.code, e.request_id), (Code.BAD_REQUEST, None), bad)

    def test_unknown_op(self):
        """An unknown op is unknown_op, and the reply carries the request id."""
        e = refused(self, b'{"id":7,"op":"launch"}')
        self.assertEqual((e.code, e.request_id), (Code.UNKNOWN_OP, 7))

    def test_missing_and_wrong_type(self):
        """A missing or wrong-typed field is bad_request naming the field."""
        e = refused(self, b'{"id":1,"op":"block"}')
        self.assertEqual(e.code, Code.BAD_REQUEST)
        self.assertIn("'user'", e.message)
        e = refused(self, b'{"id":1,"op":"block","user":5}')
        self.assertIn("'user' must be a string", e.message)
        e = refused(self, b'{"id":1,"op":"login","username":"a","password":"p","port":true}')
        self.assertIn("'port'", e.message)
        e = refused(self, b'{"id":1,"op":"login","username":"a","password":"p","port":70000}')
        self.assertIn("'port'", e.message)

    def test_ack_list(self):
        """ack takes a bounded list of integers."""
        self.assertEqual(decode_request(b'{"id":1,"op":"ack","seqs":[1,2]}').args["seqs"], [1, 2])
        for bad in ['"1"', "[1,\"2\"]", "[true]", json.dumps(list(range(1001)))]:
            self.assertEqual(refused(self, ('{"id":1,"op":"ack","seqs":%s}' % bad).encode()).code, Code.BAD_REQUEST)

    def test_lone_surrogate(self):
        """A string with a lone surrogate escape is not Unicode text (it could not be re-encoded):
        the line is refused as bad_json."""
        for line in [b'{"id":1,"op":"broadcast","text":"\\ud800"}', b'{"id":"\\udc00","op":"ping"}']:
            self.assertEqual(refused(self, line).code, Code.BAD_JSON, line)


class EncodeTests(SynchronousTestCase):
    def test_reply_round_trip(self):
        """A result line decodes back into an ok Reply."""
        frame = decode_frame(wire.encode_result(4, {"users": ["a"]}))
        self.assertEqual(frame, Reply(4, True, {"users": ["a"]}))

    def test_error_round_trip(self):
        """An error line decodes into a Reply carrying code and message."""
        frame = decode_frame(wire.encode_error(None, Code.BAD_JSON, "no"))
        self.assertEqual((frame.ok, frame.code, frame.message, frame.id), (False, "bad_json", "no", None))

    def test_event(self):
        """Events have no id and decode into Event."""
        line = wire.encode_event("presence", user="bob", status="online")
        self.assertNotIn(b'"id"', line)
        self.assertEqual(decode_frame(line), Event("presence", {"user": "bob", "status": "online"}))

    def test_one_line(self):
        """Encoded frames are exactly one line, even when strings contain newlines."""
        line = wire.encode_event("broadcast", text="a\nb\r\nc")
        self.assertEqual(line.count(b"\n"), 1)
        self.assertTrue(line.endswith(b"\n"))

    def test_request_too_long(self):
        """The client refuses to build a line longer than the limit."""
        self.assertRaises(WireError, wire.encode_request, 1, "broadcast", text="x" * (wire.MAX_LINE + 1))

    def test_unicode(self):
        """Non-ASCII text survives as UTF-8."""
        line = wire.encode_request(1, "broadcast", text="héllo ✓", signature="s")
        self.assertIn("✓".encode(), line)
        self.assertEqual(decode_request(line.rstrip(b"\n")).args["text"], "héllo ✓")


class PropertyTests(SynchronousTestCase):
    @settings(max_examples=300, deadline=None)
    @given(st.binary(max_size=512))
    def test_garbage_only_raises_wire_error(self, data):
        """Any bytes at all either decode or raise WireError, never anything else."""
        try:
            decode_request(data)
        except WireError as e:
            self.assertIn(e.code, vars(Code).values())

    @settings(max_examples=200, deadline=None)
    @given(st.text(max_size=200), st.integers(min_value=0, max_value=2**53 - 1))
    def test_broadcast_round_trip(self, text, request_id):
        """Whatever valid text a client sends comes out of the decoder unchanged."""
        try:
            line = wire.encode_request(request_id, "broadcast", text=text, signature="s")
        except UnicodeEncodeError:
            return  # lone surrogates cannot be sent at all
        try:
            request = decode_request(line.rstrip(b"\n"))
        except WireError as e:
            self.assertEqual(e.code, Code.BAD_REQUEST)
            self.assertTrue(len(text) == 0 or len(text) > wire.MAX_BROADCAST)
            return
        self.assertEqual((request.id, request.args["text"]), (request_id, text))
