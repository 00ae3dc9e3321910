from support import A, B


def test_message_between_two_online_users(relay):
    with relay.ws() as a, relay.ws() as b:
        a.auth(A)
        b.auth(B)
        a.send({"type": "message", "to": B, "content": "hi", "messageId": "m1", "timestamp": 5})
        assert a.recv()["type"] == "delivered"
        assert b.recv() == {"type": "message", "from": A, "content": "hi", "messageId": "m1",
                            "timestamp": 5, "queued": False}
