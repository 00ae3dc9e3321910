"""relayd's PostgreSQL schema: versioned migrations, applied in one transaction at start-up under an advisory lock.

``MIGRATIONS[i]`` upgrades schema version i to i + 1. Append, never edit: a
database records every version it went through in ``relayd_schema_version``.
Several instances starting together take the same advisory lock, so one
migrates and the others find the work done.

An enqueue is one call of ``relayd_enqueue`` (one round trip, committed on
return), a batch one call of ``relayd_enqueue_many``. It first locks the recipient's row in ``queues``, so the enqueues of
one recipient are serialised: seqs are taken and committed in the same order,
and a reader paging by seq never skips a message that commits late. The
duplicate, delivered, budget and cap checks then run under that lock, as the
SQLite backend runs them on its single writer.
"""

from __future__ import annotations

import time
from typing import Any

from ..store import StoreOpenError

LOCK_ID = 0x524C5944  # "RLYD": the advisory lock migrations hold

_ENQUEUE = r"""
CREATE FUNCTION relayd_enqueue(p_recipient text, p_sender text, p_message_id text, p_timestamp bigint,
    p_queued_at bigint, p_content text, p_size bigint, p_max_messages bigint, p_max_bytes bigint, p_drop_oldest boolean,
    p_max_total bigint, p_stored_total bigint,
    OUT o_result text, OUT o_seq bigint, OUT o_added bigint, OUT o_added_bytes bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    q_count bigint;
    q_bytes bigint;
    m_size bigint := p_size;
    victim record;
BEGIN
    o_seq := 0; o_added := 0; o_added_bytes := 0;
    INSERT INTO queues AS q (recipient, count, bytes, receipts) VALUES (p_recipient, 0, 0, 0)
        ON CONFLICT (recipient) DO UPDATE SET count = q.count
        RETURNING q.count, q.bytes INTO q_count, q_bytes;
    SELECT m.seq INTO o_seq FROM messages m
        WHERE m.recipient = p_recipient AND m.message_id = p_message_id AND lower(m.sender) = lower(p_sender);
    IF FOUND THEN
        o_result := 'duplicate';
        RETURN;
    END IF;
    o_seq := 0;
    IF EXISTS (SELECT 1 FROM delivered d WHERE d.recipient = p_recipient AND d.message_id = p_message_id
               AND d.sender = lower(p_sender)) THEN
        o_result := 'delivered';
    ELSIF p_max_total > 0 AND p_stored_total + m_size > p_max_total THEN
        o_result := 'no_space';
    ELSIF m_size > p_max_bytes OR ((q_count >= p_max_messages OR q_bytes + m_size > p_max_bytes)
                                   AND NOT p_drop_oldest) THEN
        o_result := 'full';
    END IF;
    IF o_result IS NOT NULL THEN
        DELETE FROM queues WHERE recipient = p_recipient AND count <= 0 AND receipts <= 0;
        RETURN;
    END IF;
    o_seq := nextval('message_seq');
    INSERT INTO messages (seq, recipient, sender, message_id, timestamp, queued_at, size, content)
        VALUES (o_seq, p_recipient, p_sender, p_message_id, p_timestamp, p_queued_at, m_size, p_content);
    o_added := 1; o_added_bytes := m_size;
    IF q_count > 0 AND (q_count >= p_max_messages OR q_bytes + m_size > p_max_bytes) THEN
        FOR victim IN SELECT m.seq AS vseq, m.size AS vsize FROM messages m
                      WHERE m.recipient = p_recipient AND m.seq <> o_seq ORDER BY m.seq LOOP
            EXIT WHEN NOT (q_count > 0 AND (q_count >= p_max_messages OR q_bytes + m_size > p_max_bytes));
            DELETE FROM messages WHERE seq = victim.vseq;
            q_count := q_count - 1; q_bytes := q_bytes - victim.vsize;
            o_added := o_added - 1; o_added_bytes := o_added_bytes - victim.vsize;
        END LOOP;
    END IF;
    UPDATE queues SET count = count + o_added, bytes = bytes + o_added_bytes WHERE recipient = p_recipient;
    o_result := 'queued';
END
$fn$"""

_ENQUEUE_MANY = r"""
CREATE FUNCTION relayd_enqueue_many(p_recipients text[], p_senders text[], p_message_ids text[], p_timestamps bigint[],
    p_queued_ats bigint[], p_contents text[], p_sizes bigint[], p_max_messages bigint, p_max_bytes bigint,
    p_drop_oldest boolean, p_max_total bigint, p_stored_total bigint)
RETURNS TABLE (o_result text, o_seq bigint, o_added bigint, o_added_bytes bigint)
LANGUAGE plpgsql AS $fn$
DECLARE
    one record;
    stored_total bigint := p_stored_total;
BEGIN
    -- every writer locks several queues in address order, so two batches never wait on each other in a cycle
    INSERT INTO queues AS q (recipient, count, bytes, receipts)
        SELECT DISTINCT r, 0, 0, 0 FROM unnest(p_recipients) AS u(r) ORDER BY 1
        ON CONFLICT (recipient) DO UPDATE SET count = q.count;
    FOR i IN 1 .. coalesce(array_length(p_recipients, 1), 0) LOOP
        SELECT * INTO one FROM relayd_enqueue(p_recipients[i], p_senders[i], p_message_ids[i], p_timestamps[i],
            p_queued_ats[i], p_contents[i], p_sizes[i], p_max_messages, p_max_bytes, p_drop_oldest, p_max_total,
            stored_total);
        stored_total := stored_total + one.o_added_bytes;
        o_result := one.o_result; o_seq := one.o_seq; o_added := one.o_added; o_added_bytes := one.o_added_bytes;
        RETURN NEXT;
    END LOOP;
END
$fn$"""

_NOW_MS = "(extract(epoch FROM clock_timestamp()) * 1000)::bigint"
CLUSTER_LOCK = 0x524C5943  # "RLYC": per-address advisory locks that order presence writes against routed enqueues
BUDGET_LOCK = 0x524C5942  # "RLYB": per-budget advisory locks

_PRESENCE = r"""
CREATE FUNCTION relayd_presence(p_address text, p_watcher text, p_ttl bigint) RETURNS text[]
LANGUAGE plpgsql AS $fn$
BEGIN
    -- after this lock, a join of the address either committed (and is read below) or waits for this transaction
    PERFORM pg_advisory_xact_lock(%(lock)d, hashtext(p_address));
    IF p_watcher <> '' THEN
        INSERT INTO cluster_watchers (address, instance, expires_at) VALUES (p_address, p_watcher, %(now)s + p_ttl)
            ON CONFLICT (address, instance) DO UPDATE SET expires_at = excluded.expires_at;
    END IF;
    RETURN (SELECT coalesce(array_agg(v.x ORDER BY p.instance, v.o), '{}') FROM cluster_presence p,
            LATERAL (VALUES (1, p.instance), (2, p.kind)) AS v(o, x) WHERE p.address = p_address);
END
$fn$""" % {"lock": CLUSTER_LOCK, "now": _NOW_MS}

_JOIN = r"""
CREATE FUNCTION relayd_join(p_address text, p_instance text, p_kind text, p_ttl bigint,
    OUT o_watchers text[], OUT o_presence text[])
LANGUAGE plpgsql AS $fn$
DECLARE
    now_ms bigint := %(now)s;
BEGIN
    PERFORM pg_advisory_xact_lock(%(lock)d, hashtext(p_address));
    IF p_kind = '' THEN
        DELETE FROM cluster_presence WHERE address = p_address AND instance = p_instance;
    ELSE
        INSERT INTO cluster_presence (address, instance, kind) VALUES (p_address, p_instance, p_kind)
            ON CONFLICT (address, instance) DO UPDATE SET kind = excluded.kind;
    END IF;
    WITH gone AS (DELETE FROM cluster_watchers WHERE address = p_address RETURNING instance, expires_at)
        SELECT coalesce(array_agg(instance), '{}') INTO o_watchers FROM gone WHERE expires_at > now_ms;
    INSERT INTO cluster_watchers (address, instance, expires_at) VALUES (p_address, p_instance, now_ms + p_ttl);
    o_presence := relayd_presence(p_address, '', 0);
END
$fn$""" % {"lock": CLUSTER_LOCK, "now": _NOW_MS}

_ENQUEUE_ROUTED = r"""
CREATE FUNCTION relayd_enqueue_routed(p_recipient text, p_sender text, p_message_id text, p_timestamp bigint,
    p_queued_at bigint, p_content text, p_size bigint, p_max_messages bigint, p_max_bytes bigint,
    p_drop_oldest boolean, p_max_total bigint, p_stored_total bigint, p_watcher text, p_ttl bigint,
    OUT o_result text, OUT o_seq bigint, OUT o_added bigint, OUT o_added_bytes bigint, OUT o_presence text[])
LANGUAGE plpgsql AS $fn$
BEGIN
    SELECT e.o_result, e.o_seq, e.o_added, e.o_added_bytes INTO o_result, o_seq, o_added, o_added_bytes
        FROM relayd_enqueue(p_recipient, p_sender, p_message_id, p_timestamp, p_queued_at, p_content, p_size,
                            p_max_messages, p_max_bytes, p_drop_oldest, p_max_total, p_stored_total) AS e;
    o_presence := relayd_presence(p_recipient, p_watcher, p_ttl);
END
$fn$"""

_HEARTBEAT = r"""
CREATE FUNCTION relayd_heartbeat(p_instance text, p_ttl bigint, p_forget bigint,
    OUT o_age bigint, OUT o_live text[], OUT o_lapsed text[], OUT o_dead text[])
LANGUAGE plpgsql AS $fn$
DECLARE
    now_ms bigint := %(now)s;
BEGIN
    SELECT now_ms - beat_at INTO o_age FROM cluster_instances WHERE instance = p_instance;
    INSERT INTO cluster_instances (instance, beat_at) VALUES (p_instance, now_ms)
        ON CONFLICT (instance) DO UPDATE SET beat_at = excluded.beat_at;
    o_live := ARRAY(SELECT instance FROM cluster_instances WHERE beat_at >= now_ms - p_ttl ORDER BY instance);
    o_lapsed := ARRAY(SELECT instance FROM cluster_instances WHERE beat_at < now_ms - p_ttl ORDER BY instance);
    o_dead := ARRAY(SELECT instance FROM cluster_instances WHERE beat_at < now_ms - p_forget ORDER BY beat_at
                    LIMIT 10);
    -- expired watches and budgets; rows another instance is deleting are left to it (never a lock wait)
    DELETE FROM cluster_watchers WHERE (address, instance) IN (SELECT address, instance FROM cluster_watchers
        WHERE expires_at < now_ms LIMIT 1000 FOR UPDATE SKIP LOCKED);
    DELETE FROM cluster_budgets WHERE (key, recipient) IN (SELECT key, recipient FROM cluster_budgets
        WHERE expires_at <= now_ms LIMIT 1000 FOR UPDATE SKIP LOCKED);
END
$fn$""" % {"now": _NOW_MS}

_FORGET = r"""
CREATE FUNCTION relayd_forget(p_instance text, p_limit integer, OUT o_addresses text[], OUT o_watchers text[])
LANGUAGE plpgsql AS $fn$
DECLARE
    h integer;
BEGIN
    o_addresses := ARRAY(SELECT address FROM cluster_presence WHERE instance = p_instance ORDER BY address
                         LIMIT p_limit);
    FOR h IN SELECT DISTINCT hashtext(a) FROM unnest(o_addresses) AS u(a) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(%(lock)d, h);
    END LOOP;
    o_watchers := ARRAY(SELECT DISTINCT instance FROM cluster_watchers
                        WHERE address = ANY(o_addresses) AND expires_at > %(now)s ORDER BY 1);
    DELETE FROM cluster_watchers WHERE address = ANY(o_addresses);
    DELETE FROM cluster_presence WHERE instance = p_instance AND address = ANY(o_addresses);
END
$fn$""" % {"lock": CLUSTER_LOCK, "now": _NOW_MS}

_SPEND = r"""
CREATE FUNCTION relayd_spend(p_key text, p_recipient text, p_budget bigint, p_window bigint) RETURNS boolean
LANGUAGE plpgsql AS $fn$
DECLARE
    now_ms bigint := %(now)s;
    n bigint;
    window_end bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(%(lock)d, hashtext(p_key));
    DELETE FROM cluster_budgets WHERE key = p_key AND expires_at <= now_ms;
    IF EXISTS (SELECT 1 FROM cluster_budgets WHERE key = p_key AND recipient = p_recipient) THEN
        RETURN true;
    END IF;
    SELECT count(*), min(expires_at) INTO n, window_end FROM cluster_budgets WHERE key = p_key;
    IF n >= p_budget THEN
        RETURN false;
    END IF;
    INSERT INTO cluster_budgets (key, recipient, expires_at) VALUES (p_key, p_recipient,
        coalesce(window_end, now_ms + p_window));
    RETURN true;
END
$fn$""" % {"lock": BUDGET_LOCK, "now": _NOW_MS}

_JOIN_LABELLED = r"""
CREATE FUNCTION relayd_join(p_address text, p_instance text, p_kind text, p_ttl bigint, p_label text DEFAULT NULL,
    OUT o_watchers text[], OUT o_presence text[])
LANGUAGE plpgsql AS $fn$
DECLARE
    now_ms bigint := %(now)s;
BEGIN
    PERFORM pg_advisory_xact_lock(%(lock)d, hashtext(p_address));
    IF p_kind = '' THEN
        DELETE FROM cluster_presence WHERE address = p_address AND instance = p_instance;
    ELSE
        INSERT INTO cluster_presence (address, instance, kind, label) VALUES (p_address, p_instance, p_kind, p_label)
            ON CONFLICT (address, instance) DO UPDATE SET kind = excluded.kind, label = excluded.label;
    END IF;
    WITH gone AS (DELETE FROM cluster_watchers WHERE address = p_address RETURNING instance, expires_at)
        SELECT coalesce(array_agg(instance), '{}') INTO o_watchers FROM gone WHERE expires_at > now_ms;
    INSERT INTO cluster_watchers (address, instance, expires_at) VALUES (p_address, p_instance, now_ms + p_ttl);
    o_presence := relayd_presence(p_address, '', 0);
END
$fn$""" % {"lock": CLUSTER_LOCK, "now": _NOW_MS}

_FORGET_LABELLED = r"""
CREATE FUNCTION relayd_forget(p_instance text, p_limit integer, OUT o_addresses text[], OUT o_watchers text[],
    OUT o_labels text[])
LANGUAGE plpgsql AS $fn$
DECLARE
    h integer;
BEGIN
    SELECT coalesce(array_agg(address ORDER BY address), '{}'), coalesce(array_agg(coalesce(label, address)
           ORDER BY address), '{}') INTO o_addresses, o_labels
        FROM (SELECT address, label FROM cluster_presence WHERE instance = p_instance ORDER BY address
              LIMIT p_limit) AS mine;
    FOR h IN SELECT DISTINCT hashtext(a) FROM unnest(o_addresses) AS u(a) ORDER BY 1 LOOP
        PERFORM pg_advisory_xact_lock(%(lock)d, h);
    END LOOP;
    o_watchers := ARRAY(SELECT DISTINCT instance FROM cluster_watchers
                        WHERE address = ANY(o_addresses) AND expires_at > %(now)s ORDER BY 1);
    DELETE FROM cluster_watchers WHERE address = ANY(o_addresses);
    DELETE FROM cluster_presence WHERE instance = p_instance AND address = ANY(o_addresses);
END
$fn$""" % {"lock": CLUSTER_LOCK, "now": _NOW_MS}

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        "CREATE SEQUENCE message_seq",
        """CREATE TABLE messages (
            seq BIGINT PRIMARY KEY,
            recipient TEXT NOT NULL,
            sender TEXT NOT NULL,
            message_id TEXT NOT NULL,
            timestamp BIGINT NOT NULL,
            queued_at BIGINT NOT NULL,
            size BIGINT NOT NULL,
            content TEXT NOT NULL)""",
        "CREATE UNIQUE INDEX messages_ident ON messages (recipient, message_id, lower(sender))",
        "CREATE INDEX messages_recipient_seq ON messages (recipient, seq)",
        "CREATE INDEX messages_queued_at ON messages (queued_at)",
        """CREATE TABLE queues (
            recipient TEXT PRIMARY KEY,
            count BIGINT NOT NULL,
            bytes BIGINT NOT NULL,
            receipts BIGINT NOT NULL)""",
        """CREATE TABLE receipts (
            seq BIGSERIAL PRIMARY KEY,
            recipient TEXT NOT NULL,
            reader TEXT NOT NULL,
            message_id TEXT NOT NULL,
            timestamp BIGINT NOT NULL)""",
        "CREATE INDEX receipts_recipient_seq ON receipts (recipient, seq)",
        "CREATE INDEX receipts_timestamp ON receipts (timestamp)",
        """CREATE TABLE delivered (
            recipient TEXT NOT NULL,
            message_id TEXT NOT NULL,
            sender TEXT NOT NULL,
            queued_at BIGINT NOT NULL,
            PRIMARY KEY (recipient, message_id, sender))""",
        "CREATE INDEX delivered_queued_at ON delivered (queued_at)",
        """CREATE TABLE keys (
            address TEXT PRIMARY KEY,
            public_key TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            updated_at BIGINT NOT NULL,
            key_type TEXT,
            issued_at BIGINT,
            format TEXT,
            signature TEXT,
            used_at BIGINT)""",
        "CREATE INDEX keys_unsigned_last_use ON keys (GREATEST(updated_at, COALESCE(used_at, 0))) "
        "WHERE signature IS NULL",
        "CREATE TABLE key_floors (address TEXT PRIMARY KEY, issued_at BIGINT NOT NULL)",
        "CREATE TABLE locks (address TEXT PRIMARY KEY, locked_at BIGINT NOT NULL)",
        "CREATE TABLE tokens (hash TEXT PRIMARY KEY, address TEXT NOT NULL, expires_at BIGINT NOT NULL)",
        "CREATE INDEX tokens_address ON tokens (address, expires_at)",
        """CREATE TABLE push_subscriptions (
            address TEXT NOT NULL,
            id TEXT NOT NULL,
            provider TEXT NOT NULL,
            target TEXT NOT NULL,
            p256dh TEXT NOT NULL,
            auth TEXT NOT NULL,
            created_at BIGINT NOT NULL,
            expires_at BIGINT NOT NULL,
            PRIMARY KEY (address, id))""",
        "CREATE INDEX push_subscriptions_expires_at ON push_subscriptions (expires_at)",
        """CREATE TABLE relayd_owner (
            id INTEGER PRIMARY KEY CHECK (id = 1),
            host TEXT NOT NULL,
            pid INTEGER NOT NULL,
            since BIGINT NOT NULL)""",
        _ENQUEUE,
        _ENQUEUE_MANY,
    ),
    (   # message history ([history] days): delivered messages kept as stored, once per message, for their
        # recipient
        """CREATE TABLE history (
            recipient TEXT NOT NULL,
            message_id TEXT NOT NULL,
            sender_key TEXT NOT NULL,
            sender TEXT NOT NULL,
            content TEXT NOT NULL,
            timestamp BIGINT NOT NULL,
            queued_at BIGINT NOT NULL,
            seq BIGINT NOT NULL,
            kept_until BIGINT NOT NULL,
            size BIGINT NOT NULL,
            PRIMARY KEY (recipient, message_id, sender_key))""",
        "CREATE INDEX history_page ON history (recipient, timestamp, seq)",
        "CREATE INDEX history_kept_until ON history (kept_until)",
    ),
    (  # several instances on one database (relayd.cluster): presence, watches, heartbeats, shared budgets;
       # unlogged: after a crash they are empty, and every instance writes its presence again (a lapse)
        "CREATE UNLOGGED TABLE cluster_instances (instance TEXT PRIMARY KEY, beat_at BIGINT NOT NULL, "
        "counts TEXT NOT NULL DEFAULT '{}')",
        "CREATE UNLOGGED TABLE cluster_presence (address TEXT NOT NULL, instance TEXT NOT NULL, kind TEXT NOT NULL, "
        "PRIMARY KEY (address, instance))",
        "CREATE INDEX cluster_presence_instance ON cluster_presence (instance, address)",
        "CREATE UNLOGGED TABLE cluster_watchers (address TEXT NOT NULL, instance TEXT NOT NULL, "
        "expires_at BIGINT NOT NULL, PRIMARY KEY (address, instance))",
        "CREATE INDEX cluster_watchers_expires_at ON cluster_watchers (expires_at)",
        "CREATE UNLOGGED TABLE cluster_budgets (key TEXT NOT NULL, recipient TEXT NOT NULL, "
        "expires_at BIGINT NOT NULL, PRIMARY KEY (key, recipient))",
        "CREATE INDEX cluster_budgets_expires_at ON cluster_budgets (expires_at)",
        _PRESENCE,
        _JOIN,
        _ENQUEUE_ROUTED,
        _HEARTBEAT,
        _FORGET,
        _SPEND,
    ),
    (  # encryption at rest on a cluster: presence is keyed by the blind index of the address (the sealing
       # layer's queue key) and each entry carries its address sealed (``label``), for the online list and for
       # forgetting a dead instance's entries; NULL: ``address`` is the address (no encryption, or an instance
       # of the version before, whose 4-argument calls still work)
        "ALTER TABLE cluster_presence ADD COLUMN label TEXT",
        "DROP FUNCTION relayd_join(text, text, text, bigint)",
        _JOIN_LABELLED,
        "DROP FUNCTION relayd_forget(text, integer)",
        _FORGET_LABELLED,
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(conn: Any) -> None:
    """Bring the schema to SCHEMA_VERSION, one recorded step per version, in one transaction."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", LOCK_ID)
        await conn.execute("CREATE TABLE IF NOT EXISTS relayd_schema_version ("
                           "version INTEGER PRIMARY KEY, applied_at BIGINT NOT NULL)")
        current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM relayd_schema_version")
        if current > SCHEMA_VERSION:
            raise StoreOpenError(f"database has relayd schema version {current}, newer than {SCHEMA_VERSION}; "
                                 "upgrade relayd")
        if current == 0 and await conn.fetchval("SELECT to_regclass('messages') IS NOT NULL"):
            raise StoreOpenError("the database already has a table named messages that is not relayd's: give "
                                 "relayd a database (or a schema, via the URL's options) of its own")
        for version in range(current + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO relayd_schema_version (version, applied_at) VALUES ($1, $2)",
                               version, int(time.time() * 1000))
