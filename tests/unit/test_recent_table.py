"""`Recent`, the duplicate table: what counts as a second delivery, and its memory bounds."""

from __future__ import annotations

from bridge.core.service import Recent

A, B = b"digest-a", b"digest-b"


def test_the_same_key_and_payload_within_the_window_is_a_duplicate() -> None:
    r = Recent(window=10)
    r.remember("d", "q1", A, now=100)
    assert r.duplicate("d", "q1", A, now=109.9)
    assert not r.duplicate("d", "q1", A, now=110)  # the window has passed
    assert not r.duplicate("d", "q1", B, now=101)  # another payload under the same id
    assert not r.duplicate("d", "q2", A, now=101)
    assert not r.duplicate("other", "q1", A, now=101)  # ids are per device


def test_claim_takes_a_key_once_and_release_gives_it_back() -> None:
    r = Recent(window=10)
    assert r.claim("d", "q1", A, now=0)
    assert not r.claim("d", "q1", A, now=1)  # the second delivery
    r.release("d", "q1", A)  # refused: asked again, it is a new try
    assert r.claim("d", "q1", A, now=2)
    assert r.claim("d", "q1", B, now=3)  # another payload took the key
    r.release("d", "q1", A)  # ... so the first one's refusal leaves it taken
    assert not r.claim("d", "q1", B, now=4)
    assert r.count == 1


def test_forget_lets_the_same_request_be_asked_again() -> None:
    r = Recent(window=10)
    r.remember("d", "q1", A, now=0)
    r.forget("d", "q1")
    assert not r.duplicate("d", "q1", A, now=1)
    assert r.count == 0
    r.forget("d", "q1")  # twice, or a key never seen: nothing happens
    r.forget("nobody", "x")
    assert r.count == 0


def test_remembering_a_key_again_renews_it_without_counting_it_twice() -> None:
    r = Recent(window=10)
    r.remember("d", "q1", A, now=0)
    r.remember("d", "q1", B, now=8)
    assert r.count == 1
    assert r.duplicate("d", "q1", B, now=17) and not r.duplicate("d", "q1", A, now=9)


def test_a_device_keeps_at_most_per_device_entries_its_oldest_go_first() -> None:
    r = Recent(window=1000, per_device=3)
    for i in range(5):
        r.remember("d", f"q{i}", A, now=i)
    assert r.count == 3
    assert [r.duplicate("d", f"q{i}", A, now=5) for i in range(5)] == [False, False, True, True,
                                                                       True]  # fmt: skip


def test_overall_the_least_recently_active_device_loses_entries_first() -> None:
    r = Recent(window=1000, per_device=10, total=4)
    r.remember("old", "a", A, now=0)
    r.remember("old", "b", A, now=1)
    r.remember("new", "c", A, now=2)
    r.remember("new", "d", A, now=3)
    # "old" is active again, so "new" is now the least recently active: it pays.
    r.remember("old", "e", A, now=4)
    assert r.count == 4
    kept = {k: r.duplicate(d, k, A, now=5) for d, k in
            [("old", "a"), ("old", "b"), ("new", "c"), ("new", "d"), ("old", "e")]}  # fmt: skip
    assert kept == {"a": True, "b": True, "c": False, "d": True, "e": True}
    r.remember("third", "f", A, now=6)
    assert r.count == 4
    assert not r.duplicate("new", "d", A, now=7)
    assert "new" not in r._devices  # its last entry went: so did the device


def test_a_device_whose_entries_all_went_is_dropped_from_the_table() -> None:
    r = Recent(window=1000, per_device=10, total=2)
    r.remember("a", "1", A, now=0)
    r.remember("b", "1", A, now=1)
    r.remember("b", "2", A, now=2)
    assert r.count == 2
    assert "a" not in r._devices


def test_many_devices_inventing_ids_cost_bounded_entries() -> None:
    r = Recent(window=1000, per_device=64, total=500)
    for n in range(5000):
        r.remember(f"dev{n % 50}", f"id{n}", A, now=n)
    assert r.count == 500
    assert sum(len(seen) for seen in r._devices.values()) == 500
