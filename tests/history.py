"""Records what clients of a relay saw under faults, and checks it against the delivery guarantees.

A ``History`` is written by many client threads at once (every method takes its lock): each send attempt of a
message and its answer, each recipient session (opened, closed) and each message frame it received, each
confirmed ``ack``, the faults (start, heal) and ``/health/ready`` probes. ``check(history)`` returns the
``Finding``s; ``summary(findings)`` words them for an assertion message. Times are ``time.monotonic()``.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

# Answers whose write is known to be applied (the message must arrive) or known not to be (it must not).
APPLIED = ("delivered", "queued")
NOT_APPLIED = "error:storage_unavailable"
# Attempt outcomes that say nothing about the write: the client resends the same messageId.
UNKNOWN = ("error:storage_timeout", "no_answer", "connection_lost")


@dataclass
class Attempt:
    instance: int
    sent_at: float
    answer: str | None = None  # "delivered", "queued", "error:<code>", "no_answer", "connection_lost"
    answered_at: float | None = None


@dataclass
class Send:
    sender: str
    recipient: str
    mid: str
    seq: int  # the order the sender first sent it in, per (sender, recipient)
    attempts: list[Attempt] = field(default_factory=list)


@dataclass
class Session:
    sid: int
    address: str
    instance: int
    ack: bool
    opened_at: float
    closed_at: float | None = None


@dataclass
class Receipt:
    sid: int
    sender: str
    mid: str
    queued: bool
    at: float
    acked_at: float | None = None  # when an ack for it was confirmed (a pong after the ack)


@dataclass
class Fault:
    name: str
    start: float
    heal: float | None = None


@dataclass
class Probe:
    instance: int
    status: int | None  # None: no answer within the probe's timeout
    at: float


@dataclass
class Finding:
    kind: str  # lost, order, duplicate, error_but_applied, late_behind_open_session, slow_answer, ready_stayed_up
    detail: str


class History:
    """Everything the test's clients did and saw; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sends: dict[tuple[str, str, str], Send] = {}
        self.sessions: dict[int, Session] = {}
        self.receipts: list[Receipt] = []
        self.faults: list[Fault] = []
        self.probes: list[Probe] = []
        self._seq: Counter[tuple[str, str]] = Counter()
        # Set by a test that expects Redis hangs to be answered in time and seen by /health/ready:
        self.answer_bound_s: float | None = None
        self.expect_not_ready: tuple[int, ...] = ()

    # Writers

    def __getstate__(self) -> dict[str, object]:
        """Pickled without its lock, to keep a failed run's history for study."""
        with self.lock:
            return {k: v for k, v in self.__dict__.items() if k != "lock"}

    def __setstate__(self, state: dict[str, object]) -> None:
        self.__dict__.update(state)
        self.lock = threading.Lock()

    def send(self, sender: str, recipient: str, mid: str, instance: int, at: float | None = None) -> Attempt:
        """Record one send attempt (the first one fixes the message's place in the sender's order)."""
        key = (sender.lower(), recipient.lower(), mid)
        with self.lock:
            entry = self.sends.get(key)
            if entry is None:
                self._seq[key[:2]] += 1
                entry = self.sends[key] = Send(key[0], key[1], mid, self._seq[key[:2]])
            attempt = Attempt(instance, time.monotonic() if at is None else at)
            entry.attempts.append(attempt)
            return attempt

    def answer(self, attempt: Attempt, answer: str, at: float | None = None) -> None:
        with self.lock:
            attempt.answer = answer
            attempt.answered_at = time.monotonic() if at is None else at

    def open_session(self, sid: int, address: str, instance: int, ack: bool, at: float | None = None) -> None:
        with self.lock:
            self.sessions[sid] = Session(sid, address.lower(), instance, ack,
                                         time.monotonic() if at is None else at)

    def close_session(self, sid: int, at: float | None = None) -> None:
        with self.lock:
            session = self.sessions.get(sid)
            if session is not None and session.closed_at is None:
                session.closed_at = time.monotonic() if at is None else at

    def receive(self, sid: int, sender: str, mid: str, queued: bool, at: float | None = None) -> Receipt:
        receipt = Receipt(sid, sender.lower(), mid, queued, time.monotonic() if at is None else at)
        with self.lock:
            self.receipts.append(receipt)
        return receipt

    def acked(self, receipts: list[Receipt], at: float | None = None) -> None:
        with self.lock:
            for receipt in receipts:
                receipt.acked_at = time.monotonic() if at is None else at

    def ack_failed(self, sid: int, within_s: float = 5.0) -> None:
        """The relay said an ack write of session ``sid`` failed: its recent acks are not confirmed after all."""
        now = time.monotonic()
        with self.lock:
            for receipt in self.receipts:
                if receipt.sid == sid and receipt.acked_at is not None and now - receipt.acked_at < within_s:
                    receipt.acked_at = None

    def fault(self, name: str, at: float | None = None) -> Fault:
        with self.lock:
            self.faults.append(fault := Fault(name, time.monotonic() if at is None else at))
            return fault

    def heal(self, fault: Fault, at: float | None = None) -> None:
        with self.lock:
            fault.heal = time.monotonic() if at is None else at

    def probe(self, instance: int, status: int | None, at: float | None = None) -> None:
        with self.lock:
            self.probes.append(Probe(instance, status, time.monotonic() if at is None else at))

    # Readers

    def applied(self) -> list[Send]:
        """Messages answered delivered or queued at least once."""
        return [s for s in self.sends.values() if any(a.answer in APPLIED for a in s.attempts)]

    def received_count(self, send: Send) -> int:
        return sum(1 for r in self.receipts if (r.sender, r.mid) == (send.sender, send.mid)
                   and self.sessions[r.sid].address == send.recipient)

    def missing(self) -> list[Send]:
        """Applied messages no session of the recipient has received (yet)."""
        with self.lock:
            got = {(r.sender, self.sessions[r.sid].address, r.mid) for r in self.receipts}
            return [s for s in self.applied() if (s.sender, s.recipient, s.mid) not in got]


def check(history: History, *, deliver_within_s: float = 1.0, slack_s: float = 1.0) -> list[Finding]:
    """Every guarantee the relay gives, checked on ``history``; one Finding per violation."""
    with history.lock:
        return (_lost(history, slack_s) + _order(history) + _duplicates(history) + _error_but_applied(history)
                + _late(history, deliver_within_s + slack_s) + _slow(history) + _ready(history, slack_s))


def _receipts_by_message(h: History) -> dict[tuple[str, str, str], list[Receipt]]:
    by: dict[tuple[str, str, str], list[Receipt]] = defaultdict(list)
    for r in h.receipts:
        by[(r.sender, h.sessions[r.sid].address, r.mid)].append(r)
    return by


def _answers(send: Send) -> str:
    return ",".join(f"{a.answer}@node{a.instance}" for a in send.attempts)


def _lost(h: History, slack_s: float) -> list[Finding]:
    got = _receipts_by_message(h)
    return [Finding("lost", f"{s.mid} {s.sender[:8]}->{s.recipient[:8]} answered {_answers(s)}, never received")
            for s in h.sends.values() if any(a.answer in APPLIED for a in s.attempts)
            and (s.sender, s.recipient, s.mid) not in got and not _dropped_by_a_closing_app(h, s, slack_s)]


def _dropped_by_a_closing_app(h: History, s: Send, slack_s: float) -> bool:
    """A message delivered live just as the recipient's only session, a plain one, stopped reading and closed:
    its bytes reached the client's TCP stack, which is all a plain session promises (docs/protocol.md), and the
    client dropped them while closing, as an app that closes its socket does. An ``ack`` session would have got
    it again."""
    answered = [a.answered_at for a in s.attempts if a.answer == "delivered" and a.answered_at is not None]
    if not answered:
        return False
    at = min(answered)
    sessions = [x for x in h.sessions.values() if x.address == s.recipient and x.opened_at <= at]
    closing = [x for x in sessions if not x.ack and x.closed_at is not None
               and x.closed_at - 0.1 * slack_s <= at <= x.closed_at + slack_s]
    still_open = [x for x in sessions if x.closed_at is None or x.closed_at > at]
    return bool(closing) and all(x in closing for x in still_open)


def _order(h: History) -> list[Finding]:
    """Per session and sender, the send order of received messages never goes backwards (repeats skipped).

    A message's place is that of its first attempt that may have taken effect: an attempt refused with
    ``storage_unavailable`` stored nothing, so a resend after later messages is a later message. A message
    whose first such attempt had an unknown outcome (``storage_timeout``, no answer, a lost connection) may take
    effect at any time until it is answered, as an indeterminate operation does: it is not placed."""
    findings = []
    rank = _effective_order(h)
    floating = {key for key, send in h.sends.items() if _indeterminate(send)}
    highest: dict[tuple[int, str], tuple[int, str]] = {}
    seen: set[tuple[int, str, str]] = set()
    for r in sorted(h.receipts, key=lambda r: r.at):
        key = (r.sender, h.sessions[r.sid].address, r.mid)
        if key not in h.sends or key in floating or (r.sid, r.sender, r.mid) in seen:
            continue
        seen.add((r.sid, r.sender, r.mid))
        place = rank[key]
        top = highest.get((r.sid, r.sender))
        if top is not None and place < top[0]:
            findings.append(Finding("order", f"session {r.sid}: {r.mid} (#{place}) from {r.sender[:8]} "
                                             f"after {top[1]} (#{top[0]})"))
        else:
            highest[(r.sid, r.sender)] = (place, r.mid)
    return findings


def _indeterminate(send: Send) -> bool:
    """Whether the first attempt of ``send`` that was not refused outright has an unknown outcome."""
    took = [a for a in send.attempts if a.answer != "error:storage_unavailable"]
    return bool(took) and min(took, key=lambda a: a.sent_at).answer in UNKNOWN


def _effective_order(h: History) -> dict[tuple[str, str, str], int]:
    """Each message's place among its sender's messages to its recipient, by its first attempt that was not
    refused outright (the first send when every attempt was)."""
    by_pair: dict[tuple[str, str], list[tuple[float, int, tuple[str, str, str]]]] = {}
    for key, send in h.sends.items():
        took = [a.sent_at for a in send.attempts if a.answer != "error:storage_unavailable"]
        first = min(took) if took else send.attempts[0].sent_at
        by_pair.setdefault(key[:2], []).append((first, send.seq, key))
    rank: dict[tuple[str, str, str], int] = {}
    for entries in by_pair.values():
        for place, (_, _, key) in enumerate(sorted(entries), 1):
            rank[key] = place
    return rank


def _duplicates(h: History) -> list[Finding]:
    """A message received again, unless the earlier copy was on an ack session whose ack was never confirmed,
    or was pushed by an instance that died before answering its sender (its record of the delivery, written
    just after the push, may have died with it; the README states this bound)."""
    findings = []
    for (sender, recipient, mid), receipts in _receipts_by_message(h).items():
        receipts.sort(key=lambda r: r.at)
        send = h.sends.get((sender, recipient, mid))
        died = {a.instance for a in send.attempts if a.answer == "connection_lost"} if send else set()
        for i, later in enumerate(receipts[1:], 1):
            earlier = [r for r in receipts[:i] if not (h.sessions[r.sid].ack and r.acked_at is None)
                       and h.sessions[r.sid].instance not in died]
            if earlier:
                copies = ", ".join(f"{r.sid}{' ack' if h.sessions[r.sid].ack else ''}"
                                   f"{' queued' if r.queued else ' live'}@{r.at:.2f}" for r in receipts)
                findings.append(Finding("duplicate", f"{mid} {sender[:8]}->{recipient[:8]} "
                                                     f"({_answers(h.sends[(sender, recipient, mid)]) if (sender, recipient, mid) in h.sends else 'unsent'}) "
                                                     f"received on sessions {copies}"))
                break
    return findings


def _error_but_applied(h: History) -> list[Finding]:
    """storage_unavailable means nothing was stored: with every attempt so answered, it must never arrive."""
    got = _receipts_by_message(h)
    return [Finding("error_but_applied", f"{s.mid} {s.sender[:8]}->{s.recipient[:8]} answered {_answers(s)}, "
                                         "yet received")
            for s in h.sends.values() if s.attempts and all(a.answer == NOT_APPLIED for a in s.attempts)
            and (s.sender, s.recipient, s.mid) in got]


def _heal_after(h: History, t: float) -> float:
    """``t``, or the heal time of a fault under way at ``t`` (the latest of them)."""
    base = t
    for fault in h.faults:
        if fault.start <= t:
            base = max(base, fault.heal if fault.heal is not None else float("inf"))
    return base


def _late(h: History, within: float) -> list[Finding]:
    """A message answered queued while a session of its recipient was open reaches that session within
    ``within`` seconds of the answer (or of the heal of a fault under way then), with no reconnect."""
    findings = []
    got = _receipts_by_message(h)
    for s in h.sends.values():
        queued = next((a for a in s.attempts if a.answer == "queued" and a.answered_at is not None), None)
        if queued is None:
            continue
        deadline = _heal_after(h, queued.answered_at) + within  # type: ignore[arg-type]
        first_sent = s.attempts[0].sent_at
        watching = [x for x in h.sessions.values() if x.address == s.recipient and x.opened_at < first_sent
                    and (x.closed_at is None or x.closed_at >= deadline)]
        if not watching:
            continue
        receipts = got.get((s.sender, s.recipient, s.mid), [])
        on_time = [r for r in receipts if r.at <= deadline and r.sid in {x.sid for x in watching}]
        if on_time:
            continue
        if not receipts:
            how = "never received"
        else:
            first = min(receipts, key=lambda r: r.at)
            where = "the open session" if first.sid in {x.sid for x in watching} else f"session {first.sid} only"
            how = f"received {first.at - queued.answered_at:.2f} s after the answer on {where}"  # type: ignore
        findings.append(Finding("late_behind_open_session",
                                f"{s.mid} {s.sender[:8]}->{s.recipient[:8]} queued with session(s) "
                                f"{[x.sid for x in watching]} open: {how}"))
    return findings


def _slow(h: History) -> list[Finding]:
    """With ``answer_bound_s`` set, every attempt is answered within it (a hung Redis is no excuse)."""
    if h.answer_bound_s is None:
        return []
    findings = []
    for s in h.sends.values():
        for a in s.attempts:
            if a.answer == "connection_lost":
                continue
            took = (a.answered_at - a.sent_at) if a.answered_at is not None else float("inf")
            if a.answer == "no_answer" or took > h.answer_bound_s:
                findings.append(Finding("slow_answer", f"{s.mid} via node{a.instance}: {a.answer} after "
                                                       f"{took:.2f} s (bound {h.answer_bound_s:.2f} s)"))
    return findings


def _ready(h: History, slack: float) -> list[Finding]:
    """Each instance in ``expect_not_ready`` answers /health/ready 503 at least once during every fault."""
    findings = []
    for fault in h.faults:
        end = (fault.heal if fault.heal is not None else float("inf")) + slack
        for instance in h.expect_not_ready:
            seen = [p.status for p in h.probes if p.instance == instance and fault.start <= p.at <= end]
            if 503 not in seen:
                findings.append(Finding("ready_stayed_up", f"node{instance} during {fault.name}: /health/ready "
                                                           f"answered {sorted(Counter(seen).items(), key=str)}"))
    return findings


def summary(findings: list[Finding], examples: int = 3) -> str:
    """Counts per kind, then a few examples of each: the assertion message of a fault test."""
    if not findings:
        return "no findings"
    counts = Counter(f.kind for f in findings)
    lines = ["findings: " + ", ".join(f"{kind}={n}" for kind, n in sorted(counts.items()))]
    for kind in sorted(counts):
        lines += [f"  {kind}: {f.detail}" for f in [f for f in findings if f.kind == kind][:examples]]
    return "\n".join(lines)


def stats(history: History) -> str:
    """What the run did: answers per kind, frames received, sessions opened."""
    with history.lock:
        answers = Counter(a.answer for s in history.sends.values() for a in s.attempts)
        queued = sum(1 for r in history.receipts if r.queued)
        return (f"{len(history.sends)} messages, answers {dict(sorted(answers.items(), key=str))}, "
                f"{len(history.receipts)} received ({queued} queued: true), {len(history.sessions)} sessions")


def counts(findings: list[Finding]) -> dict[str, int]:
    return dict(Counter(f.kind for f in findings))
