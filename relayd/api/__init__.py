"""The REST API beside the WebSocket: a request value in, a response value out (keys, messages, presence,
the push key, health, metrics and the status page), with its per-IP budgets."""
