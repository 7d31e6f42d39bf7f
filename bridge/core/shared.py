"""State the workers of one group share: duplicates, streams per device, counters, a leader.

Several bridge processes (`BRIDGE_GROUP`) serve one prefix; each request goes
to one of them (an MQTT shared subscription). What must hold across all of
them lives here: a request seen by one worker is a duplicate for every other,
a device's `max_streams` and daily budget count every worker's requests, and
one worker (the leader) publishes the bridge-wide retained messages.

Two backends: SQLite in `BRIDGE_DATA_DIR` (workers on one host) and Redis
(`BRIDGE_STATE_URL=redis://...`, workers anywhere). Every operation is one
atomic step of the store (a transaction, a Lua script), so two workers
deciding at the same moment cannot both win.

When the store fails (Redis restarted, unreachable), `Guarded` answers from
this worker's own memory and says so once in the log: the bridge keeps
serving, with limits counted per worker until the store is back.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections import Counter, OrderedDict
from pathlib import Path
from typing import Any, NamedTuple, Protocol

log = logging.getLogger("bridge.core.shared")

SHARED_FILE = "shared.sqlite3"
_RATE_WINDOW = 60.0
# How long a peer's `interrupted` answers for a dead worker's requests are remembered
# for that worker's return (its journal then holds the same requests).
ANSWERED_TTL = 7 * 86400


class Held(NamedTuple):
    """A request a worker took in hand, and where its terminal goes should the worker die."""

    device: str
    key: str  #: its duplicate-detection key
    topic: str
    correlation: bytes | None


class Settled(NamedTuple):
    """What `settle` found of a worker whose requests are being answered."""

    answered: set[tuple[str, str]]  #: (device, key) a peer answered from `take_holds`
    holds: list[Held]  #: what the worker held, now dropped: each is the caller's to answer


def utc_day(now: float) -> str:
    """The UTC date a daily budget is counted in, `YYYY-MM-DD`."""
    return time.strftime("%Y-%m-%d", time.gmtime(now))


def use_wal(db: sqlite3.Connection, tries: int = 50) -> None:
    """Put a database shared by several processes in WAL mode.

    Workers of a group open the same file at once: the switch needs the file to
    itself, and SQLite answers "database is locked" at once, without waiting for
    its timeout, to the second process that asks for it then.
    """
    for attempt in range(tries):
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or attempt == tries - 1:
                raise
            time.sleep(0.02 * (1 + attempt % 5))


class Store(Protocol):
    """What the workers of a group share. Times are wall-clock seconds (`time.time()`)."""

    def claim(self, device: str, key: str, digest: bytes, now: float, window: float) -> bool:
        """Take request `key` of `device` with payload `digest`: False when a worker
        already took the same payload within `window` seconds (a duplicate)."""
        ...

    def forget(self, device: str, key: str, digest: bytes | None = None) -> None:
        """The request ended with an error (or was refused): asking again is a new request.
        With `digest`, only a claim of that same payload is dropped."""
        ...

    def open_stream(self, device: str, key: str, token: str, worker: str, limit: int) -> int:
        """Count a running request of `device`: -1 when counted, else the number running
        (at least `limit`). A `key` already running replaces it without adding one."""
        ...

    def close_stream(self, device: str, key: str, token: str) -> int:
        """The request of `token` ended (a request that replaced it keeps its count);
        how many of `device` still run, on every worker (one round trip for both)."""
        ...

    def drop_worker(self, worker: str) -> None:
        """Forget the streams of `worker` (its replacement calls this when it starts)."""
        ...

    def requests_since(self, device: str, since: float) -> list[float]: ...

    def add_request(self, device: str, now: float) -> None: ...

    def add_tokens(self, device: str, tokens: int, now: float) -> None: ...

    def tokens(self, device: str, day: str) -> int: ...

    def add_counts(self, counts: dict[str, int]) -> None:
        """Add to the group's counters (`P/bridge/stats`: requests, errors, tokens...)."""
        ...

    def counts(self) -> dict[str, int]: ...

    def lead(self, worker: str, ttl: float, now: float) -> bool:
        """Become or stay the group's leader for `ttl` seconds; False when another leads."""
        ...

    def resign(self, worker: str) -> None: ...

    def take_slot(self, owner: str, slots: int, ttl: float, now: float) -> int:
        """Hold worker slot 1..`slots` for `ttl` seconds: the one `owner` held, else the
        lowest free one; 0 when all are held (replicas of one container image)."""
        ...

    def take(self, worker: str, held: Held, digest: bytes, now: float, window: float) -> bool:
        """`claim` and `hold` in one atomic step: False for a duplicate (nothing held).

        One round trip, and no moment when the request is claimed but not held:
        a worker that dies then would leave its retry a duplicate until the window
        ends, with nobody to answer for it."""
        ...

    def hold(self, worker: str, held: Held) -> None:
        """`worker` took request `held` in hand (its duplicate record is the worker's)."""
        ...

    def unhold(self, worker: str, device: str, key: str) -> None:
        """The request's terminal is out: nobody need answer for it."""
        ...

    def take_holds(self, worker: str, now: float) -> list[Held]:
        """The requests a dead `worker` held, for its taker to answer: each is given to
        one caller once, and noted as answered until `settle`."""
        ...

    def settle(self, worker: str) -> Settled:
        """`worker`'s requests are being answered from its journal (it restarted, or a
        peer on its host reads it): its holds go, so that nobody answers them twice.
        What a peer already answered from `take_holds` is for the journal to skip;
        the holds dropped are for the caller to answer where the journal has none
        (the worker died between taking a request and journaling it)."""
        ...

    def beat(self, worker: str, ttl: float, now: float) -> bool:
        """`worker` is alive for `ttl` more seconds (every worker, every third of the TTL).
        False when it was not among the living: its first beat, or it was taken for dead."""
        ...

    def take_answered(self, worker: str) -> set[tuple[str, str]]:
        """The (device, key) of `worker`'s requests a peer answered from `take_holds`
        while it lived (taken for dead); forgotten here."""
        ...

    def leave(self, worker: str) -> None:
        """`worker` stopped cleanly: nobody need take its place."""
        ...

    def silent(self, now: float) -> list[str]:
        """The workers whose last beat has run out: dead, or cut off from the store."""
        ...

    def take_silent(self, worker: str, now: float) -> bool:
        """Take a silent worker's place (once: True for one caller, then it is forgotten)."""
        ...

    def close(self) -> None: ...


class SqliteStore:
    """The shared state in one SQLite file: for workers on one host (same `BRIDGE_DATA_DIR`)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._lock = threading.Lock()
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=5)
        use_wal(self.db)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.executescript(
            """
            CREATE TABLE IF NOT EXISTS recent (
                device TEXT NOT NULL, key TEXT NOT NULL, digest BLOB NOT NULL, at REAL NOT NULL,
                PRIMARY KEY (device, key));
            CREATE INDEX IF NOT EXISTS recent_by_time ON recent (at);
            CREATE TABLE IF NOT EXISTS streams (
                device TEXT NOT NULL, key TEXT NOT NULL, token TEXT NOT NULL,
                worker TEXT NOT NULL, PRIMARY KEY (device, key));
            CREATE TABLE IF NOT EXISTS requests (device TEXT NOT NULL, at REAL NOT NULL);
            CREATE INDEX IF NOT EXISTS requests_by_device ON requests (device, at);
            CREATE TABLE IF NOT EXISTS usage (
                device TEXT NOT NULL, day TEXT NOT NULL,
                requests INTEGER NOT NULL DEFAULT 0, tokens INTEGER NOT NULL DEFAULT 0,
                PRIMARY KEY (device, day));
            CREATE TABLE IF NOT EXISTS leader (
                name TEXT PRIMARY KEY, worker TEXT NOT NULL, until REAL NOT NULL);
            CREATE TABLE IF NOT EXISTS counts (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
            CREATE TABLE IF NOT EXISTS alive (worker TEXT PRIMARY KEY, until REAL NOT NULL);
            DROP TABLE IF EXISTS held;
            CREATE TABLE IF NOT EXISTS holding (
                worker TEXT NOT NULL, device TEXT NOT NULL, key TEXT NOT NULL,
                topic TEXT NOT NULL, corr BLOB, PRIMARY KEY (worker, device, key));
            CREATE TABLE IF NOT EXISTS answered (
                worker TEXT NOT NULL, device TEXT NOT NULL, key TEXT NOT NULL,
                at REAL NOT NULL, PRIMARY KEY (worker, device, key));
            """
        )
        self._claims = 0

    def _tx(self) -> Any:
        """BEGIN IMMEDIATE: the write lock is taken first, so read-then-write is atomic."""
        return _Immediate(self.db, self._lock)

    def claim(self, device: str, key: str, digest: bytes, now: float, window: float) -> bool:
        with self._tx():
            return self._claim(device, key, digest, now, window)

    def _claim(self, device: str, key: str, digest: bytes, now: float, window: float) -> bool:
        """`claim` within the caller's transaction."""
        row = self.db.execute(
            "SELECT digest, at FROM recent WHERE device = ? AND key = ?", (device, key)
        ).fetchone()
        if row is not None and bytes(row[0]) == digest and now - float(row[1]) < window:
            return False
        self.db.execute(
            "INSERT OR REPLACE INTO recent VALUES (?, ?, ?, ?)", (device, key, digest, now)
        )
        self._claims += 1
        if self._claims % 1000 == 0:  # bounded: what left the window goes
            self.db.execute("DELETE FROM recent WHERE at < ?", (now - window,))
        return True

    def take(self, worker: str, held: Held, digest: bytes, now: float, window: float) -> bool:
        with self._tx():
            if not self._claim(held.device, held.key, digest, now, window):
                return False
            self._hold(worker, held)
            return True

    def forget(self, device: str, key: str, digest: bytes | None = None) -> None:
        with self._lock:
            if digest is None:
                self.db.execute("DELETE FROM recent WHERE device = ? AND key = ?", (device, key))
            else:
                self.db.execute(
                    "DELETE FROM recent WHERE device = ? AND key = ? AND digest = ?",
                    (device, key, digest),
                )

    def open_stream(self, device: str, key: str, token: str, worker: str, limit: int) -> int:
        with self._tx():
            found = self.db.execute(
                "SELECT 1 FROM streams WHERE device = ? AND key = ?", (device, key)
            ).fetchone()
            if found is None and limit:
                (running,) = self.db.execute(
                    "SELECT COUNT(*) FROM streams WHERE device = ?", (device,)
                ).fetchone()
                if running >= limit:
                    return int(running)
            self.db.execute(
                "INSERT OR REPLACE INTO streams VALUES (?, ?, ?, ?)", (device, key, token, worker)
            )
            return -1

    def close_stream(self, device: str, key: str, token: str) -> int:
        with self._lock:
            self.db.execute(
                "DELETE FROM streams WHERE device = ? AND key = ? AND token = ?",
                (device, key, token),
            )
            (n,) = self.db.execute(
                "SELECT COUNT(*) FROM streams WHERE device = ?", (device,)
            ).fetchone()
        return int(n)

    def drop_worker(self, worker: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM streams WHERE worker = ?", (worker,))

    def requests_since(self, device: str, since: float) -> list[float]:
        with self._lock:
            rows = self.db.execute(
                "SELECT at FROM requests WHERE device = ? AND at > ? ORDER BY at", (device, since)
            ).fetchall()
        return [float(r[0]) for r in rows]

    def add_request(self, device: str, now: float) -> None:
        with self._tx():
            self.db.execute("INSERT INTO requests VALUES (?, ?)", (device, now))
            self.db.execute("DELETE FROM requests WHERE at < ?", (now - _RATE_WINDOW,))
            self.db.execute(
                "INSERT INTO usage (device, day, requests) VALUES (?, ?, 1) "
                "ON CONFLICT (device, day) DO UPDATE SET requests = requests + 1",
                (device, utc_day(now)),
            )

    def add_tokens(self, device: str, tokens: int, now: float) -> None:
        with self._lock:
            self.db.execute(
                "INSERT INTO usage (device, day, tokens) VALUES (?, ?, ?) "
                "ON CONFLICT (device, day) DO UPDATE SET tokens = tokens + excluded.tokens",
                (device, utc_day(now), tokens),
            )

    def tokens(self, device: str, day: str) -> int:
        with self._lock:
            row = self.db.execute(
                "SELECT tokens FROM usage WHERE device = ? AND day = ?", (device, day)
            ).fetchone()
        return int(row[0]) if row else 0

    def add_counts(self, counts: dict[str, int]) -> None:
        with self._tx():
            for name, value in counts.items():
                self.db.execute(
                    "INSERT INTO counts VALUES (?, ?) "
                    "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
                    (name, value),
                )

    def counts(self) -> dict[str, int]:
        with self._lock:
            rows = self.db.execute("SELECT name, value FROM counts").fetchall()
        return {str(n): int(v) for n, v in rows}

    def lead(self, worker: str, ttl: float, now: float) -> bool:
        with self._tx():
            row = self.db.execute("SELECT worker, until FROM leader WHERE name = 'l'").fetchone()
            if row is not None and row[0] != worker and float(row[1]) > now:
                return False
            self.db.execute("INSERT OR REPLACE INTO leader VALUES ('l', ?, ?)", (worker, now + ttl))
            return True

    def resign(self, worker: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM leader WHERE name = 'l' AND worker = ?", (worker,))

    def take_slot(self, owner: str, slots: int, ttl: float, now: float) -> int:
        with self._tx():
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS slots (i INTEGER PRIMARY KEY, owner TEXT, until REAL)"
            )
            rows = {int(i): (o, float(u)) for i, o, u in self.db.execute("SELECT * FROM slots")}
            mine = [i for i, (o, _u) in rows.items() if o == owner and i <= slots]
            free = [i for i in range(1, slots + 1) if i not in rows or rows[i][1] <= now]
            slot = mine[0] if mine else (free[0] if free else 0)
            if slot:
                self.db.execute(
                    "INSERT OR REPLACE INTO slots VALUES (?, ?, ?)", (slot, owner, now + ttl)
                )
            return slot

    def hold(self, worker: str, held: Held) -> None:
        with self._lock:
            self._hold(worker, held)

    def _hold(self, worker: str, held: Held) -> None:
        self.db.execute("INSERT OR REPLACE INTO holding VALUES (?, ?, ?, ?, ?)", (worker, *held))

    def unhold(self, worker: str, device: str, key: str) -> None:
        with self._lock:
            self.db.execute(
                "DELETE FROM holding WHERE worker = ? AND device = ? AND key = ?",
                (worker, device, key),
            )

    def take_holds(self, worker: str, now: float) -> list[Held]:
        with self._tx():
            rows = self._pop_holds(worker)
            self.db.execute("DELETE FROM answered WHERE at < ?", (now - ANSWERED_TTL,))
            self.db.executemany(
                "INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?)",
                [(worker, d, k, now) for d, k, _t, _c in rows],
            )
        return _sqlite_held(rows)

    def settle(self, worker: str) -> Settled:
        with self._tx():
            return Settled(self._answered(worker), _sqlite_held(self._pop_holds(worker)))

    def _pop_holds(self, worker: str) -> list[Any]:
        """Read and drop `worker`'s holds (in the caller's transaction)."""
        rows = self.db.execute(
            "SELECT device, key, topic, corr FROM holding WHERE worker = ?", (worker,)
        ).fetchall()
        self.db.execute("DELETE FROM holding WHERE worker = ?", (worker,))
        return rows

    def take_answered(self, worker: str) -> set[tuple[str, str]]:
        with self._tx():
            return self._answered(worker)

    def _answered(self, worker: str) -> set[tuple[str, str]]:
        """Read and forget what peers answered for `worker` (in the caller's transaction)."""
        rows = self.db.execute(
            "SELECT device, key FROM answered WHERE worker = ?", (worker,)
        ).fetchall()
        self.db.execute("DELETE FROM answered WHERE worker = ?", (worker,))
        return {(str(d), str(k)) for d, k in rows}

    def beat(self, worker: str, ttl: float, now: float) -> bool:
        with self._tx():
            known = self.db.execute("SELECT 1 FROM alive WHERE worker = ?", (worker,)).fetchone()
            self.db.execute("INSERT OR REPLACE INTO alive VALUES (?, ?)", (worker, now + ttl))
        return known is not None

    def leave(self, worker: str) -> None:
        with self._lock:
            self.db.execute("DELETE FROM alive WHERE worker = ?", (worker,))

    def silent(self, now: float) -> list[str]:
        with self._lock:
            rows = self.db.execute("SELECT worker FROM alive WHERE until <= ?", (now,)).fetchall()
        return [str(w) for (w,) in rows]

    def take_silent(self, worker: str, now: float) -> bool:
        with self._lock:
            cur = self.db.execute(
                "DELETE FROM alive WHERE worker = ? AND until <= ?", (worker, now)
            )
        return cur.rowcount == 1

    def close(self) -> None:
        with self._lock:
            self.db.close()


def _sqlite_held(rows: list[Any]) -> list[Held]:
    return [Held(str(d), str(k), str(t), None if c is None else bytes(c)) for d, k, t, c in rows]


class _Immediate:
    def __init__(self, db: sqlite3.Connection, lock: threading.Lock) -> None:
        self.db = db
        self.lock = lock

    def __enter__(self) -> None:
        self.lock.acquire()
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except BaseException:
            self.lock.release()
            raise

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type is not None else "COMMIT")
        finally:
            self.lock.release()


# Lua scripts: each runs atomically in Redis.
# `claim`; for `take`, also the request held by the worker (KEYS[2]) in the same step.
_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
if #KEYS > 1 then redis.call('HSET', KEYS[2], ARGV[3], ARGV[4]) end
return 1
"""
_FORGET_IF = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 0
"""
_OPEN = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0 and tonumber(ARGV[4]) > 0 then
  local n = redis.call('HLEN', KEYS[1])
  if n >= tonumber(ARGV[4]) then return n end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. '|' .. ARGV[3])
redis.call('SADD', KEYS[2], KEYS[1] .. '\\n' .. ARGV[1])
return -1
"""
# The worker's index (ARGV[3] .. worker) is named from the value: one round trip.
_CLOSE = """
local v = redis.call('HGET', KEYS[1], ARGV[1])
if v and string.sub(v, 1, string.len(ARGV[2]) + 1) == ARGV[2] .. '|' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('SREM', ARGV[3] .. string.match(v, '[^|]*$'), KEYS[1] .. '\\n' .. ARGV[1])
end
return redis.call('HLEN', KEYS[1])
"""
_DROP = """
for _, m in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local i = string.find(m, '\\n', 1, true)
  local h, f = string.sub(m, 1, i - 1), string.sub(m, i + 1)
  local v = redis.call('HGET', h, f)
  if v and string.sub(v, -string.len(ARGV[1]) - 1) == '|' .. ARGV[1] then
    redis.call('HDEL', h, f)
  end
end
redis.call('DEL', KEYS[1])
return 0
"""
_LEAD = """
local v = redis.call('GET', KEYS[1])
if v and v ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

_TAKE_SILENT = """
local due = redis.call('ZSCORE', KEYS[1], ARGV[1])
if due and tonumber(due) <= tonumber(ARGV[2]) then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
return 0
"""

# A dead worker's holds, for one taker: read and removed, their keys noted as answered.
_TAKE_HOLDS = """
local rows = redis.call('HGETALL', KEYS[1])
if #rows == 0 then return rows end
redis.call('DEL', KEYS[1])
for i = 1, #rows, 2 do redis.call('SADD', KEYS[2], rows[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[1])
return rows
"""


def _member(device: str, key: str) -> str:
    """A (device, request key) pair as one member of a Redis set or hash."""
    return f"{device}\n{key}"


def _reply(held: Held) -> str:
    """Where a held request's terminal goes, as the value of its member."""
    return json.dumps([held.topic, held.correlation.hex() if held.correlation else None])


def _redis_held(member: bytes, reply: bytes) -> Held:
    """A hold as `hold` and `take` wrote it: the pair, then where its terminal goes."""
    device, key = _pair(member)
    topic, corr = json.loads(reply)
    return Held(device, key, topic, bytes.fromhex(corr) if corr else None)


def _pair(member: bytes) -> tuple[str, str]:
    device, _, key = bytes(member).decode().partition("\n")
    return device, key


class RedisStore:
    """The shared state in Redis (`BRIDGE_STATE_URL=redis://host:6379/0`): workers anywhere.

    Keys start with `llm-bridge:<group>:`; duplicate records expire with the
    window, rate records after a minute, daily usage after two days.
    """

    def __init__(self, url: str, namespace: str, timeout: float = 0.5) -> None:
        import redis  # noqa: PLC0415 (only workers that use Redis need the client)

        self.r = redis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=5
        )
        self.ns = f"llm-bridge:{namespace}:"
        self._claim = self.r.register_script(_CLAIM)
        self._forget_if = self.r.register_script(_FORGET_IF)
        self._open = self.r.register_script(_OPEN)
        self._close = self.r.register_script(_CLOSE)
        self._drop = self.r.register_script(_DROP)
        self._lead = self.r.register_script(_LEAD)
        self._take_silent = self.r.register_script(_TAKE_SILENT)
        self._take_holds = self.r.register_script(_TAKE_HOLDS)

    def _k(self, *parts: str) -> str:
        return self.ns + ":".join(parts)

    def claim(self, device: str, key: str, digest: bytes, now: float, window: float) -> bool:
        ms = max(int(window * 1000), 1)
        return bool(self._claim(keys=[self._k("recent", device, key)], args=[digest, ms]))

    def take(self, worker: str, held: Held, digest: bytes, now: float, window: float) -> bool:
        ms = max(int(window * 1000), 1)
        keys = [self._k("recent", held.device, held.key), self._k("holding", worker)]
        args: list[bytes | str | int] = [digest, ms, _member(held.device, held.key), _reply(held)]
        return bool(self._claim(keys=keys, args=args))

    def forget(self, device: str, key: str, digest: bytes | None = None) -> None:
        k = self._k("recent", device, key)
        if digest is None:
            self.r.delete(k)
        else:
            self._forget_if(keys=[k], args=[digest])

    def open_stream(self, device: str, key: str, token: str, worker: str, limit: int) -> int:
        keys = [self._k("streams", device), self._k("worker", worker)]
        return int(self._open(keys=keys, args=[key, token, worker, limit]))

    def close_stream(self, device: str, key: str, token: str) -> int:
        # The worker's index entry is dropped with the field; the worker is read from it.
        keys = [self._k("streams", device)]
        return int(self._close(keys=keys, args=[key, token, self._k("worker", "")]))

    def drop_worker(self, worker: str) -> None:
        self._drop(keys=[self._k("worker", worker)], args=[worker])

    def requests_since(self, device: str, since: float) -> list[float]:
        k = self._k("requests", device)
        rows: Any = self.r.zrangebyscore(k, f"({since}", "+inf", withscores=True)
        return [float(score) for _member, score in rows]

    def add_request(self, device: str, now: float) -> None:
        k = self._k("requests", device)
        day = self._k("usage", utc_day(now), device)
        pipe = self.r.pipeline()
        pipe.zadd(k, {f"{now}:{time.perf_counter_ns()}": now})
        pipe.zremrangebyscore(k, "-inf", now - _RATE_WINDOW)
        pipe.expire(k, int(_RATE_WINDOW) + 1)
        pipe.hincrby(day, "requests", 1)
        pipe.expire(day, 2 * 86400)
        pipe.execute()

    def add_tokens(self, device: str, tokens: int, now: float) -> None:
        day = self._k("usage", utc_day(now), device)
        pipe = self.r.pipeline()
        pipe.hincrby(day, "tokens", tokens)
        pipe.expire(day, 2 * 86400)
        pipe.execute()

    def tokens(self, device: str, day: str) -> int:
        v = self.r.hget(self._k("usage", day, device), "tokens")
        return int(v) if v is not None else 0

    def add_counts(self, counts: dict[str, int]) -> None:
        pipe = self.r.pipeline()
        for name, value in counts.items():
            pipe.hincrby(self._k("counts"), name, value)
        pipe.execute()

    def counts(self) -> dict[str, int]:
        raw: Any = self.r.hgetall(self._k("counts"))
        return {bytes(k).decode(): int(v) for k, v in raw.items()}

    def lead(self, worker: str, ttl: float, now: float) -> bool:
        ms = max(int(ttl * 1000), 1)
        return bool(self._lead(keys=[self._k("leader")], args=[worker, ms]))

    def resign(self, worker: str) -> None:
        self._forget_if(keys=[self._k("leader")], args=[worker])

    def take_slot(self, owner: str, slots: int, ttl: float, now: float) -> int:
        for i in range(1, slots + 1):  # the one held first: a restarted replica gets it back
            if self.r.get(self._k("slot", str(i))) == owner.encode():
                self._lead(keys=[self._k("slot", str(i))], args=[owner, int(ttl * 1000)])
                return i
        for i in range(1, slots + 1):
            if self._lead(keys=[self._k("slot", str(i))], args=[owner, int(ttl * 1000)]):
                return i
        return 0

    def hold(self, worker: str, held: Held) -> None:
        self.r.hset(self._k("holding", worker), _member(held.device, held.key), _reply(held))

    def unhold(self, worker: str, device: str, key: str) -> None:
        self.r.hdel(self._k("holding", worker), _member(device, key))

    def take_holds(self, worker: str, now: float) -> list[Held]:
        keys = [self._k("holding", worker), self._k("answered", worker)]
        rows: Any = self._take_holds(keys=keys, args=[ANSWERED_TTL])
        return [_redis_held(rows[i], rows[i + 1]) for i in range(0, len(rows), 2)]

    def settle(self, worker: str) -> Settled:
        pipe = self.r.pipeline()  # MULTI/EXEC: one step
        pipe.hgetall(self._k("holding", worker))
        pipe.delete(self._k("holding", worker))
        held, _, members, _ = self._answered(pipe, worker).execute()
        return Settled({_pair(m) for m in members}, [_redis_held(*kv) for kv in held.items()])

    def take_answered(self, worker: str) -> set[tuple[str, str]]:
        members: Any = self._answered(self.r.pipeline(), worker).execute()[0]
        return {_pair(m) for m in members}

    def _answered(self, pipe: Any, worker: str) -> Any:
        """Queue on `pipe` the reading and forgetting of what peers answered for `worker`."""
        return pipe.smembers(self._k("answered", worker)).delete(self._k("answered", worker))

    def beat(self, worker: str, ttl: float, now: float) -> bool:
        added: Any = self.r.zadd(self._k("alive"), {worker: now + ttl})
        return int(added) == 0

    def leave(self, worker: str) -> None:
        self.r.zrem(self._k("alive"), worker)

    def silent(self, now: float) -> list[str]:
        rows: Any = self.r.zrangebyscore(self._k("alive"), "-inf", now)
        return [bytes(w).decode() for w in rows]

    def take_silent(self, worker: str, now: float) -> bool:
        return bool(self._take_silent(keys=[self._k("alive")], args=[worker, now]))

    def close(self) -> None:
        self.r.close()


class LocalStore:
    """This worker's own memory: what `Guarded` answers from while the shared store is away.

    Bounded like the core's duplicate table (entries expire with the window,
    at most `total` kept).
    """

    def __init__(self, total: int = 20_000) -> None:
        self.total = total
        self.recent: OrderedDict[tuple[str, str], tuple[bytes, float]] = OrderedDict()
        self.streams: dict[tuple[str, str], str] = {}
        self.per_device: Counter[str] = Counter()

    def claim(self, device: str, key: str, digest: bytes, now: float, window: float) -> bool:
        entry = self.recent.get((device, key))
        if entry is not None and entry[0] == digest and now - entry[1] < window:
            return False
        self.recent[(device, key)] = (digest, now)
        self.recent.move_to_end((device, key))
        while len(self.recent) > self.total:
            self.recent.popitem(last=False)
        return True

    def forget(self, device: str, key: str, digest: bytes | None = None) -> None:
        entry = self.recent.get((device, key))
        if entry is not None and (digest is None or entry[0] == digest):
            del self.recent[(device, key)]

    def open_stream(self, device: str, key: str, token: str, worker: str, limit: int) -> int:
        if (device, key) not in self.streams:
            if limit and self.per_device[device] >= limit:
                return self.per_device[device]
            self.per_device[device] += 1
        self.streams[(device, key)] = token
        return -1

    def close_stream(self, device: str, key: str, token: str) -> int:
        if self.streams.get((device, key)) == token:
            del self.streams[(device, key)]
            self.per_device[device] -= 1
            if self.per_device[device] <= 0:
                del self.per_device[device]
        return self.per_device.get(device, 0)


class Guarded:
    """A shared store that never raises: while it fails, this worker's memory answers.

    The first failure is logged as an error (limits now count per worker,
    duplicates are only caught within this worker); the first success after
    it as recovered. The counters of the rate and budget are not counted
    while the store is away (a device gets more, never less, than its limits).

    With `defer` (Redis), writes whose answer nobody waits for and that no
    later read of this worker depends on (`hold`, `unhold`, `add_counts`)
    are made by one thread of their own, in order: each call is a round trip,
    and on the event loop every request waited for them (docs/scaling.md,
    "The store's cost per request"). SQLite's calls are CPU, not waiting: a
    thread would only contend with the loop for the interpreter.
    """

    def __init__(self, store: Store, worker: str, *, defer: bool = False) -> None:
        self.store = store
        self.worker = worker
        self.local = LocalStore()
        self.degraded = False
        self.failures = 0
        self._defer = defer
        self._later: queue.SimpleQueue[tuple[str, tuple[Any, ...]] | None] = queue.SimpleQueue()
        self._writer: threading.Thread | None = None

    def _do_later(self, name: str, *args: Any) -> None:
        if not self._defer:
            self._do(name, None, *args)
            return
        if self._writer is None:
            self._writer = threading.Thread(target=self._write, name="store-writer", daemon=True)
            self._writer.start()
        self._later.put((name, args))

    def _write(self) -> None:
        while (item := self._later.get()) is not None:
            self._do(item[0], None, *item[1])

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until the deferred writes are made (or `timeout`); the writer then ends."""
        writer, self._writer = self._writer, None
        if writer is not None:
            self._later.put(None)
            writer.join(timeout)

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        if not self.degraded:
            self.degraded = True
            log.error(
                "shared state store unavailable (%s): duplicates and limits are counted by "
                "this worker alone until it is back", type(exc).__name__,
            )  # fmt: skip

    def _ok(self) -> None:
        if self.degraded:
            self.degraded = False
            log.warning("shared state store is back")

    def _do(self, name: str, fallback: Any, *args: Any) -> Any:
        try:
            result = getattr(self.store, name)(*args)
        except Exception as exc:  # redis.ConnectionError, TimeoutError, sqlite3.Error...
            self._failed(exc)
            return fallback(*args) if callable(fallback) else fallback
        self._ok()
        return result

    def claim(self, device: str, key: str, digest: bytes, now: float, window: float) -> bool:
        local = self.local.claim(device, key, digest, now, window)
        return bool(self._do("claim", lambda *_: local, device, key, digest, now, window))

    def take(self, worker: str, held: Held, digest: bytes, now: float, window: float) -> bool:
        # Without the store nothing is held: this worker's journal answers for it.
        local = self.local.claim(held.device, held.key, digest, now, window)
        return bool(self._do("take", lambda *_: local, worker, held, digest, now, window))

    def forget(self, device: str, key: str, digest: bytes | None = None) -> None:
        self.local.forget(device, key, digest)
        self._do("forget", None, device, key, digest)

    def open_stream(self, device: str, key: str, token: str, worker: str, limit: int) -> int:
        n: int = self._do("open_stream", self.local.open_stream, device, key, token, worker, limit)
        return n

    def close_stream(self, device: str, key: str, token: str) -> int:
        left = self.local.close_stream(device, key, token)
        n: int = self._do("close_stream", left, device, key, token)
        return n

    def drop_worker(self, worker: str) -> None:
        self._do("drop_worker", None, worker)

    def requests_since(self, device: str, since: float) -> list[float]:
        got: list[float] = self._do("requests_since", [], device, since)
        return got

    def add_request(self, device: str, now: float) -> None:
        self._do("add_request", None, device, now)

    def add_tokens(self, device: str, tokens: int, now: float) -> None:
        self._do("add_tokens", None, device, tokens, now)

    def tokens(self, device: str, day: str) -> int:
        n: int = self._do("tokens", 0, device, day)
        return n

    def add_counts(self, counts: dict[str, int]) -> None:
        self._do_later("add_counts", counts)

    def counts(self) -> dict[str, int]:
        got: dict[str, int] = self._do("counts", {})
        return got

    def lead(self, worker: str, ttl: float, now: float) -> bool:
        # Without the store no worker can know it alone leads: none does.
        return bool(self._do("lead", False, worker, ttl, now))

    def resign(self, worker: str) -> None:
        self._do("resign", None, worker)

    def take_slot(self, owner: str, slots: int, ttl: float, now: float) -> int:
        n: int = self._do("take_slot", 0, owner, slots, ttl, now)
        return n

    def hold(self, worker: str, held: Held) -> None:
        self._do_later("hold", worker, held)

    def unhold(self, worker: str, device: str, key: str) -> None:
        self._do_later("unhold", worker, device, key)

    def take_holds(self, worker: str, now: float) -> list[Held]:
        got: list[Held] = self._do("take_holds", [], worker, now)
        return got

    def settle(self, worker: str) -> Settled | None:
        """None when the store cannot say: the journal is then answered in full (a
        device may get a second `interrupted`, never none)."""
        got: Settled | None = self._do("settle", None, worker)
        return got

    def beat(self, worker: str, ttl: float, now: float) -> bool | None:
        """None while the store is away (nothing learnt)."""
        known: bool | None = self._do("beat", None, worker, ttl, now)
        return known

    def take_answered(self, worker: str) -> set[tuple[str, str]]:
        got: set[tuple[str, str]] = self._do("take_answered", set(), worker)
        return got

    def leave(self, worker: str) -> None:
        self._do("leave", None, worker)

    def silent(self, now: float) -> list[str]:
        got: list[str] = self._do("silent", [], now)
        return got

    def take_silent(self, worker: str, now: float) -> bool:
        # Without the store nobody can tell a dead worker from one cut off from it.
        return bool(self._do("take_silent", False, worker, now))

    def close(self) -> None:
        self.flush()
        try:
            self.store.close()
        except Exception:
            log.debug("closing the shared store failed", exc_info=True)


def open_store(state_url: str, data_dir: Path, namespace: str, worker: str) -> Guarded:
    """The group's store: Redis when `state_url` is `redis://...`, else SQLite in `data_dir`."""
    if state_url.startswith(("redis://", "rediss://", "unix://")):
        return Guarded(RedisStore(state_url, namespace), worker, defer=True)
    if state_url.startswith("sqlite:///"):
        return Guarded(SqliteStore(Path(state_url.removeprefix("sqlite://"))), worker)
    return Guarded(SqliteStore(data_dir / f"{namespace}-{SHARED_FILE}"), worker)
