"""The fair-share choice of a full listener, on its own (an injected clock, no sockets).

A half-open connection goes first, oldest first; else the longest idle one of the address that
holds the most (of the newcomer's own address when that is at its cap); never a protected one;
only when nothing else is left is the newcomer refused. End to end: test_fair_shares.py.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from openwb_modbus_evse.limits import ConnectionLimiter, Eviction, Slot, address_key


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


# --- the choice -----------------------------------------------------------------------------


class Book:
    """Admits through a limiter and records which slots it closed."""

    def __init__(self, max_total: int, max_per_address: int) -> None:
        self.clock = Clock()
        self.limiter = ConnectionLimiter("modbus", max_total, max_per_address, clock=self.clock)
        self.closed: list[Slot] = []
        self.names: dict[str, Slot] = {}

    def admit(self, host: str, name: str = "") -> Slot | None:
        box: list[Slot] = []
        slot = self.limiter.admit(host, lambda: self.closed.append(box[0]))
        if slot is not None:
            box.append(slot)
            self.names[name or f"{host}#{len(self.names)}"] = slot
        return slot


def test_half_open_connections_go_first_oldest_first():
    book = Book(max_total=4, max_per_address=4)
    controller = book.admit("10.0.0.1")
    assert controller is not None
    controller.establish()
    book.clock.now = 1
    idle = book.admit("10.0.0.2")
    assert idle is not None
    idle.establish()
    book.clock.now = 2
    first, second = book.admit("10.0.0.3"), book.admit("10.0.0.4")
    book.clock.now = 3
    assert book.admit("10.0.0.5") is not None
    assert book.closed == [first]  # the oldest half-open one, not the long idle ones
    assert book.admit("10.0.0.6") is not None
    assert book.closed == [first, second]


def test_without_half_open_ones_the_longest_idle_of_the_biggest_address_goes():
    book = Book(max_total=5, max_per_address=5)
    slots = {}
    for name, host, at in (
        ("a-old", "10.0.0.1", 0),
        ("b-older", "10.0.0.2", -10),  # idle longest, but its address holds one
        ("a-new", "10.0.0.1", 5),
        ("a-mid", "10.0.0.1", 3),
        ("c", "10.0.0.3", 1),
    ):
        book.clock.now = at
        slot = book.admit(host, name)
        assert slot is not None
        slot.establish()
        slots[name] = slot
    book.clock.now = 6
    slots["a-new"].touch()
    assert book.admit("10.0.0.9") is not None
    assert book.closed == [slots["a-old"]]
    assert book.limiter.open == 5


def test_among_many_tied_addresses_the_longest_idle_of_the_biggest_goes():
    """More addresses tie for the most than are compared one by one: the listener's idle
    order is walked, skipping an address that holds fewer, however long idle."""
    book = Book(max_total=19, max_per_address=2)
    loner = book.admit("10.0.1.1")
    assert loner is not None
    loner.establish()  # idle longest, but its address holds one
    pairs = []
    for i in range(9):
        for _ in range(2):
            book.clock.now += 1
            slot = book.admit(f"10.0.0.{i}")
            assert slot is not None
            slot.establish()
            pairs.append(slot)
    pairs[0].protect()
    book.clock.now += 1
    assert book.admit("10.0.2.1") is not None
    assert book.closed == [pairs[1]]  # the longest idle that may go, of an address with two


def test_at_its_own_cap_an_address_gives_up_its_own_oldest_idle_one():
    book = Book(max_total=100, max_per_address=3)
    other = book.admit("10.0.0.2")  # half-open, but of another address
    own = [book.admit("10.0.0.1") for _ in range(3)]
    assert other is not None and all(own)
    for i, slot in enumerate(reversed(own)):  # the last one is the longest idle
        book.clock.now = i
        slot.establish()
    own[0].protect()
    assert book.admit("10.0.0.1") is not None
    assert book.closed == [own[2]]


def test_protected_connections_are_never_closed_and_then_the_newcomer_is_refused():
    book = Book(max_total=3, max_per_address=2)
    refused: list[tuple[str, str]] = []
    evicted: list[tuple[str, str]] = []

    class Observer:
        def connection_refused(self, listener: str, reason: str) -> None:
            refused.append((listener, reason))

        def connection_evicted(self, listener: str, reason: str) -> None:
            evicted.append((listener, reason))

    book.limiter.observer = Observer()
    known = {"on": True}
    slots = [book.admit(h) for h in ("10.0.0.1", "10.0.0.1", "10.0.0.2")]
    for slot in slots:
        assert slot is not None
        slot.protect(when=lambda: known["on"])
    assert book.admit("10.0.0.1") is None
    assert book.admit("10.0.0.3") is None
    assert refused == [("modbus", "per_address"), ("modbus", "total")] and not book.closed
    known["on"] = False  # e.g. the registry forgot the station: it is fair game again
    assert book.admit("10.0.0.3") is not None
    assert book.closed == [slots[0]] and evicted == [("modbus", Eviction.HALF_OPEN)]


def test_an_evicted_slot_is_given_back_once(caplog):
    book = Book(max_total=1, max_per_address=1)
    first = book.admit("10.0.0.1")
    assert first is not None
    first.establish()
    second = book.admit("10.0.0.2")
    assert second is not None and book.closed == [first] and first.released
    first.release()  # the closed connection's own release comes later: no double count
    assert book.limiter.open == 1 and book.limiter.slots() == [second]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "openwb_modbus_evse.limits"]
    assert "closed the idle connection from 10.0.0.1" in line and "from 10.0.0.2" in line


# More than the limiter compares one by one (8), so that both ways of finding the longest idle
# slot among tied addresses are taken.
HOSTS = [f"10.0.0.{i}" for i in range(1, 13)]
Op = st.one_of(
    st.tuples(st.just("admit"), st.sampled_from(HOSTS)),
    st.tuples(
        st.sampled_from(["touch", "establish", "protect", "busy", "release"]), st.integers(0, 30)
    ),
    st.tuples(st.just("wait"), st.integers(1, 5)),
)


@hsettings(max_examples=400, deadline=None)
@given(
    max_total=st.integers(1, 14),
    max_per_address=st.integers(1, 4),
    ops=st.lists(Op, max_size=80),
)
def test_the_choice_keeps_the_rules(max_total, max_per_address, ops):
    """Whatever happens: the caps hold, a protected or busy slot is never the victim, a
    half-open one goes before an established one, the victim's address holds the most, and a
    newcomer is refused only when every slot it could take is protected or busy."""
    book = Book(max_total, max_per_address)
    limiter = book.limiter
    live: list[Slot] = []
    for op, arg in ops:
        if op == "wait":
            book.clock.now += arg
            continue
        if op != "admit":
            if live:
                slot = live[arg % len(live)]
                if op == "busy":
                    slot.busy = not slot.busy
                else:
                    getattr(slot, op)()
                if op == "release":
                    live.remove(slot)
            continue
        key = address_key(arg)
        own_full = sum(s.key == key for s in live) >= max_per_address
        pool = [s for s in live if s.key == key] if own_full else live
        full = own_full or len(live) >= max_total
        candidates = [s for s in pool if not s.protected and not s.busy]
        before = len(book.closed)
        slot = book.admit(arg)
        closed = book.closed[before:]
        if not full:
            assert slot is not None and not closed
        elif not candidates:
            assert slot is None and not closed
        else:
            assert slot is not None
            (victim,) = closed
            assert victim in candidates and victim.released
            half_open = [s for s in candidates if not s.established]
            if half_open:
                assert victim is half_open[0]  # the oldest: live is in the order they came
            else:
                if not own_full:
                    counts = {s.key: sum(o.key == s.key for o in live) for s in candidates}
                    assert counts[victim.key] == max(counts.values())
                same = [s for s in candidates if s.key == victim.key]
                assert victim.last_active == min(s.last_active for s in same)
            live.remove(victim)
        if slot is not None:
            live.append(slot)
        assert limiter.open == len(live) <= max_total
        assert limiter.slots() == live
        for host in HOSTS:
            assert sum(s.host == host for s in live) <= max_per_address
