"""The transport of the one port: connections, HTTP framing, admission, and the values handed to the REST API.

``gateway`` serves WebSocket sessions and REST requests on one socket and
hands them to what the composition root passes it: a ``RequestHandler`` (the
REST API, ``relayd.api``) and a ``SessionHandler`` (the router,
``relayd.protocol``). Nothing here imports ``relayd.api``: requests and
responses are plain values (``http_values``) that the API is a function
between.

websockets' private seams
-------------------------

The one-port design (REST with bodies, keep-alive and pipelining, then maybe
an upgrade, on websockets' server) and the per-connection memory and write
path reach under websockets' public API. Every such seam is listed here; the
pin in ``pyproject.toml`` (``websockets>=17.4,<18``) keeps releases that
have not been checked out, and ``tests/test_websockets_compat.py`` (named
below per seam) fails, naming the installed version and what moved, when
one breaks a seam.

Parsing (``http_connection.HttpConnection``, ``http_framing``)

- ``ServerProtocol.parser``: replaced by ``HttpConnection._parse_requests``
  (primed with ``next``), which frames requests with ``read_request``; an
  upgrade replaces it by ``frame_parser.FrameParser`` (``Protocol.parse``
  where an extension was negotiated; ``HttpConnection._to_frames``).
  Tripwires: ``test_protocol_seams_relay_connection_uses``,
  ``test_kept_alive_rest_requests_then_an_upgrade_on_one_connection``.
- ``FrameParser`` does what ``Protocol.parse`` does with the protocol's
  ``reader`` (``buffer``, ``eof``), ``recv_frame``, ``fail``,
  ``parser_exc``, ``current_size``, ``max_message_size`` /
  ``max_fragment_size``, ``debug`` and ``logger``, and websockets' ``Frame``,
  ``Opcode``, ``apply_mask`` and ``PayloadTooBig.set_current_size``. Tripwire:
  ``tests/test_frame_parser.py`` runs both parsers on the same streams, split
  at every byte, and compares frames, answers, states and errors.
- ``ServerProtocol.reader`` (a ``StreamReader``: ``read_line``,
  ``read_exact``, ``buffer``, ``eof``) and ``http11.parse_headers`` /
  ``MAX_LINE_LENGTH``, driven as generators by ``read_request``; the reader's
  ``buffer`` is also counted in the client's byte budget
  (``RelayConnection._recharge``). Tripwires:
  ``test_stream_reader_and_parse_headers_are_generators``,
  ``test_stream_reader_tells_its_end``, ``test_parse_headers_counts_every_line``,
  ``test_read_request_refuses_what_rfc_9112_refuses``.
- ``http11.Request(path, headers, method, protocol)``: built by
  ``read_request`` for ``process_request``. Tripwire:
  ``test_read_request_frames_a_body_with_websockets_request_and_headers``.
- ``ServerProtocol.events``: ``_parse_requests`` appends relayd's own events
  (``ParsedRequest``, ``BadRequest``) to it, relying on
  ``events_received()`` to hand over the list and start a new one.
  Tripwire: ``test_events_received_hands_over_the_list_relayd_appends_to``.
- ``Connection.process_event``: overridden to take those events (and frames,
  for ``RelayConnection.frame_received``); relies on ``data_received`` and
  ``eof_received`` passing every event to it. Tripwire:
  ``test_received_events_go_through_process_event``.
- ``ServerProtocol.writes``: ``_continue`` appends the raw ``100 Continue``
  answer, which ``send_data`` writes after ``data_received``. Tripwire:
  ``test_expect_100_continue_is_answered_before_the_body``.
- ``ServerProtocol.send_eof`` / ``discard``, and ``send_response`` of a
  non-101 answer sending EOF and replacing ``parser`` by ``discard()``:
  a malformed request's parser waits for that. Tripwires:
  ``test_protocol_seams_relay_connection_uses``,
  ``test_a_refusal_sends_eof_and_discards_the_rest``.

Accepting (``gateway.Gateway._accept``, ``plain_request``)

- ``serve(create_connection=...)``: called as ``create_connection(protocol,
  server, **options)`` for every accepted connection, its result given to
  asyncio as the connection's protocol untouched. relayd returns a
  ``PlainRequest`` there, which answers a plain closing request by itself
  and otherwise makes the ``RelayConnection`` with those arguments and
  moves the transport to it (asyncio's public ``set_protocol``). Tripwire:
  ``test_serve_makes_the_asyncio_protocol_with_create_connection_and_returns_it_as_is``.

The handshake (``http_connection.HttpConnection.handshake``)

- ``ServerConnection.handshake``: overridden to answer requests until one
  upgrades; relies on the server calling it as
  ``handshake(process_request, process_response, server_header)`` and on
  ``ServerConnection.__init__(protocol, server, **kwargs)`` (``serve``'s
  ``create_connection``). Tripwires:
  ``test_connection_seams_relay_connection_overrides_or_calls``,
  ``test_handshake_is_called_as_relayd_overrides_it``.
- ``ServerConnection.request_rcvd``, ``Connection.connection_lost_waiter``:
  awaited for the next request; ``request``, ``response`` and
  ``request_rcvd`` set and cleared (None once open); ``Connection.logger``
  and ``protocol.logger`` replaced by the shared ``websockets.server``
  logger, and ``Connection.id`` / ``protocol.id`` by one shared UUID
  (tripwire ``test_websockets_uses_a_connections_id_only_where_relayd_replaces_it``);
  ``protocol.process_request`` (a valid upgrade's 101 answer is written by
  ``switching_protocols``, as ``accept`` + ``serialize`` write it, with
  ``send_response``'s change of state; tripwire
  ``test_relayd_builds_the_upgrade_answer_as_websockets_accept_does``),
  ``protocol.accept`` / ``reject`` / ``send_response`` (a refusal inside
  ``send_context(expected_state=CONNECTING)``; the 101 answer, which opens
  the connection and leaves nothing to wait for, written with
  ``send_data()`` and drained only while paused). Tripwires:
  ``test_connection_seams_relay_connection_overrides_or_calls``,
  ``test_handshake_is_called_as_relayd_overrides_it``.

The WebSocket side (``connection.RelayConnection``)

- ``Connection.recv_messages``: replaced in ``connection_made`` (after
  websockets made its own) by an ``Assembler(max_queue_high,
  max_queue_low, pause=, resume=)`` whose pausing combines with the byte budget's, and its
  ``frames.queue`` (a ``SimpleQueue``'s deque) by a list (``_Frames``),
  used only through ``append``, ``popleft``, ``extendleft``, ``len`` and
  truth. Tripwires: ``test_connection_seams_relay_connection_overrides_or_calls``,
  ``test_the_containers_relayd_replaces_are_used_only_as_it_assumes``,
  ``test_the_assembler_relayd_rebuilds_is_as_it_assumes``.
- ``Connection.drain_waiters``: replaced by a list (``append``, ``remove``,
  iteration). Tripwire:
  ``test_the_containers_relayd_replaces_are_used_only_as_it_assumes``.
- ``Connection.paused`` / ``drain()`` (write flow control),
  ``protocol.send_ping`` + ``send_data()`` (the shared keepalive timer),
  ``protocol.fail`` inside ``send_context()`` (keepalive timeout), and
  ``data_received``, ``connection_made``, ``connection_lost``,
  ``resume_writing`` extended. Tripwire:
  ``test_connection_seams_relay_connection_overrides_or_calls``.
- ``Connection.send_data``: overridden to count every byte websockets
  writes (the handshake answer, pongs, the close frame) with the frames
  pushed by relayd, which the kernel's count of unacknowledged bytes is
  set against; relies on it being the only place websockets' connection
  writes to its transport. Tripwire:
  ``test_websockets_writes_only_through_send_data``.
- Frames out bypass websockets' send path: ``outbox.text_frame`` packs
  unmasked text frames itself and ``RelayConnection.flush`` writes them to
  the transport. Tripwires: ``test_relayd_builds_text_frames_as_websockets_does``,
  ``test_frames_and_responses_serialize_as_relayd_writes_them``.
- At ``connection_lost`` the reference cycles websockets leaves are cut:
  the Assembler's ``pause``/``resume`` are replaced by a no-op, the
  protocol's ``parser`` generator is closed and ``parser_exc`` loses its
  traceback, so a closed connection is freed without the garbage
  collector. Tripwire:
  ``test_a_closed_connection_is_freed_without_the_garbage_collector``.
- ``Connection.recv()`` is entered only when a whole message is queued or
  the connection is lost (``RelayConnection.idle``): an idle session waits on
  one future of relayd's, and relies on ``recv_messages.closed`` turning True
  at ``connection_lost``. Tripwire:
  ``test_connection_seams_relay_connection_overrides_or_calls``.

asyncio's own seam (``transports``)

- ``_SelectorSocketTransport._read_ready_cb`` is dropped at
  ``connection_lost``: the one reference cycle of asyncio's selector
  transports. Tripwire:
  ``test_a_closed_connection_is_freed_without_the_garbage_collector``.
"""
