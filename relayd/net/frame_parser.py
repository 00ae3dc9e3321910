"""The frame parser of an open WebSocket connection: RFC 6455 framing read straight from the protocol's buffer.

websockets parses frames with a chain of generators (``Protocol.parse`` over
``Frame.parse`` over ``StreamReader.read_exact``): every frame resumes four of
them, and an idle connection keeps two suspended and its last frame alive
(about 0.65 KiB of its 7). ``FrameParser`` takes ``Protocol.parse``'s place
once a connection is open (``HttpConnection._to_frames``) and does what it
does, in the same order: the same checks and errors (an invalid opcode or
masking as soon as the first two bytes are in, a payload over the size limit
as soon as its length is, before any of it is buffered), each whole frame to
the protocol's ``recv_frame``, and the same close codes through
``Protocol.fail``. It keeps nothing between frames. A connection that
negotiated an extension keeps websockets' parser (relayd negotiates none).
``tests/test_frame_parser.py`` checks it against websockets' on the same
streams, split at every byte.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from websockets.exceptions import PayloadTooBig, ProtocolError
from websockets.frames import CloseCode, Frame, Opcode, apply_mask
from websockets.protocol import Protocol



def _opcode(value: int) -> Opcode | None:
    try:
        return Opcode(value)
    except ValueError:
        return None


_OPCODES = tuple(map(_opcode, range(16)))
"""The opcode of each value of a frame's low four bits (None: reserved)."""


class FrameParser(Generator[None, None, None]):
    """``Protocol.parse`` for a connection without extensions (see the module docstring). Stepped with
    ``next()`` by the protocol's ``receive_data`` and ``receive_eof``, like the generator it replaces; it stops
    stepping itself once ``recv_frame`` or ``fail`` replaced it by ``discard()``."""

    __slots__ = ("protocol",)

    def __init__(self, protocol: Protocol) -> None:
        self.protocol: Protocol | None = protocol

    def __next__(self) -> None:
        """One step (``next()``, as the protocol steps its parser): not the ABC's, which goes through ``send``."""
        protocol = self.protocol
        if protocol is None:
            raise StopIteration
        try:
            self._parse(protocol)
        except ProtocolError as exc:
            protocol.fail(CloseCode.PROTOCOL_ERROR, str(exc))
            protocol.parser_exc = exc
        except EOFError as exc:
            protocol.fail(CloseCode.ABNORMAL_CLOSURE, str(exc))
            protocol.parser_exc = exc
        except UnicodeDecodeError as exc:
            protocol.fail(CloseCode.INVALID_DATA, f"{exc.reason} at position {exc.start}")
            protocol.parser_exc = exc
        except PayloadTooBig as exc:
            exc.set_current_size(protocol.current_size)
            protocol.fail(CloseCode.MESSAGE_TOO_BIG, str(exc))
            protocol.parser_exc = exc
        except Exception as exc:
            protocol.logger.error("parser failed", exc_info=True)
            protocol.fail(CloseCode.INTERNAL_ERROR)  # no details: they may be sensitive
            protocol.parser_exc = exc

    def send(self, value: None) -> None:
        self.__next__()

    def throw(self, typ: Any, val: Any = None, tb: Any = None) -> None:
        """As a generator's: the exception comes back out, and the parser is done (``close()`` goes here)."""
        self.protocol = None
        if val is None:
            val = typ() if isinstance(typ, type) else typ
        raise val

    def close(self) -> None:
        """Let go of the protocol (it holds this parser: a reference cycle otherwise)."""
        self.protocol = None

    def _parse(self, protocol: Protocol) -> None:
        """Every whole frame in the buffer to ``recv_frame``; returns when more bytes are needed."""
        reader = protocol.reader
        while protocol.parser is self:
            buffer = reader.buffer
            size = len(buffer)
            if size < 2:
                if not reader.eof:
                    return
                if size == 0:
                    if protocol.debug:
                        protocol.logger.debug("< EOF")
                    raise EOFError("unexpected end of stream")
                raise EOFError(f"stream ends after {size} bytes, expected 2 bytes")
            head1, head2 = buffer[0], buffer[1]
            opcode = _OPCODES[head1 & 0b00001111]
            if opcode is None:
                raise ProtocolError("invalid opcode")
            if not head2 & 0b10000000:  # a server reads masked frames only
                raise ProtocolError("incorrect masking")
            length = head2 & 0b01111111
            start = 2
            if length >= 126:
                extended = 2 if length == 126 else 8
                if size < 2 + extended:
                    if reader.eof:
                        raise EOFError(f"stream ends after {size - 2} bytes, expected {extended} bytes")
                    return
                length = int.from_bytes(buffer[2:2 + extended], "big")
                start = 2 + extended
            limit = _max_size(protocol)
            if limit is not None and length > limit:
                raise PayloadTooBig(length, limit)
            end = start + 4 + length
            if size < end:
                if reader.eof:
                    got, wanted = (size - start, 4) if size < start + 4 else (size - start - 4, length)
                    raise EOFError(f"stream ends after {got} bytes, expected {wanted} bytes")
                return
            data = apply_mask(buffer[start + 4:end], buffer[start:start + 4])
            del buffer[:end]
            frame = Frame(opcode, data, bool(head1 & 0b10000000), bool(head1 & 0b01000000),
                          bool(head1 & 0b00100000), bool(head1 & 0b00010000))
            frame.check()
            if protocol.debug:
                protocol.logger.debug("< %s", frame)
            protocol.recv_frame(frame)


def _max_size(protocol: Protocol) -> int | None:
    """The payload size the next frame may have: what is left of the message's limit, and the fragment's."""
    limit = protocol.max_message_size
    if limit is not None and protocol.current_size is not None:
        limit -= protocol.current_size
    fragment = protocol.max_fragment_size
    if fragment is not None:
        limit = fragment if limit is None else min(limit, fragment)
    return limit
