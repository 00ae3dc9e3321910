"""relayd: a small, durable relay daemon for the Idena P2P messenger."""

__version__ = "0.1.0"
