"""The I/O edge of the one port: connections, HTTP framing, admission and the REST API."""
