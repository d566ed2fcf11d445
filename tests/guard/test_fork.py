"""A guard made before a fork (gunicorn's ``--preload``, ``multiprocessing`` with the fork
start method) and used on both sides of it: each process talks to Lensmor over
connections of its own, and keeps track of its own calls only."""

from __future__ import annotations

from tests.helpers import run_python

# The sandbox over loopback HTTP, recording the client port of each balance read: a
# read the child makes over a connection the parent opened would come from its port.
HTTP = """
import os, signal
from creditguard import CreditGuard
from creditguard.testing import FakeLensmor, serve

fake = FakeLensmor()
ports = []

async def app(scope, receive, send):
    if scope["type"] == "http":
        ports.append(scope["client"][1])
    await fake.app(scope, receive, send)

with serve(app) as url:
    guard = CreditGuard(fake.api_key, base_url=url, allow_insecure_http=True)
    guard.balance(refresh=True)
    guard.balance(refresh=True)
    assert len(set(ports)) == 1, ports  # one kept-alive connection
    (parent,) = set(ports)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        code = 0
        try:
            total = guard.balance(refresh=True).total_balance
            assert total == 30050, total
        except BaseException as exc:
            print("child:", repr(exc), flush=True)
            code = 1
        os.write(write, b"done")
        os._exit(code)
    os.read(read, 4)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, status
    guard.balance(refresh=True)
    assert len(ports) == 4, ports
    assert ports[2] != parent, f"the child read over the parent's connection ({ports})"
    assert ports[3] == parent, ports  # the parent's connection is still its own
    guard.close()
print("ok")
"""


def _run(script: str) -> None:
    done = run_python(script)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.strip().splitlines()[-1] == "ok", done.stdout


def test_the_child_reads_over_connections_of_its_own() -> None:
    _run(HTTP)


# A RedisBackend forked while a spend of the parent is in flight: the child must not
# keep that spend's lease alive, nor record it again in Redis once the parent finished it
# (the renewer records again the reservations Redis lost, and a child that took the
# parent's for its own would make one that never ends).
REDIS = """
import os, signal, uuid
from creditguard import CreditGuard
from creditguard.redis import RedisBackend
from creditguard.testing import FakeLensmor

fake = FakeLensmor()
backend = RedisBackend(URL, prefix=f"fork-{uuid.uuid4().hex}:", lease=30)
guard = CreditGuard(fake.api_key, transport=fake.transport, backend=backend)
finished_read, finished_write = os.pipe()
with guard.spend(500):
    assert guard.snapshot().reserved == 500
    pid = os.fork()
    if pid == 0:
        signal.alarm(20)
        code = 0
        try:
            os.read(finished_read, 1)  # the parent's spend ended, and Redis knows it
            backend.renew_once()  # what the child's lease renewer does
            with guard.spend(7):  # a spend of the child's own
                assert guard.snapshot().reserved == 7, guard.snapshot()
            guard.balance(refresh=True)
            assert guard.snapshot().reserved == 0, guard.snapshot()
            guard.close()
        except BaseException as exc:
            print("child:", repr(exc), flush=True)
            code = 1
        os._exit(code)
guard.balance(refresh=True)  # the read that includes its charge releases it
assert guard.snapshot().reserved == 0, guard.snapshot()
os.write(finished_write, b"x")
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
assert guard.snapshot().reserved == 0, guard.snapshot()
guard.close()
print("ok")
"""


def test_the_child_keeps_no_lease_of_the_parents(redis_url: str) -> None:
    _run(f"URL = {redis_url!r}\n" + REDIS)


# The memory backend forked while a thread of the parent has a spend in flight and
# another holds the account's lock: the child has no calls in flight (that thread is not
# in it, and would never end its spend), so its callers neither wait for that spend nor
# for the lock, and its first call reads the balance afresh.
MEMORY = """
import os, signal, threading
from creditguard import Allowance, AllowanceExceeded, CreditGuard
from creditguard.testing import FakeLensmor

fake = FakeLensmor()  # 30,050 credits
guard = CreditGuard(
    fake.api_key, transport=fake.transport, admission_timeout=1, allowance=Allowance(1000)
)
guard.balance()
with guard.spend(100, subject="ann"):
    pass
inside, leave = threading.Event(), threading.Event()

def spend_in_flight():
    with guard.spend(500, subject="ann"):
        inside.set()
        leave.wait(30)

threading.Thread(target=spend_in_flight, daemon=True).start()
inside.wait(10)
account = guard._account
locked = threading.Event()

def hold_the_lock():
    with account.lock, guard._clients.backend._lock:
        locked.set()
        leave.wait(30)

threading.Thread(target=hold_the_lock, daemon=True).start()
locked.wait(10)
pid = os.fork()
if pid == 0:
    signal.alarm(20)
    code = 0
    try:
        snap = guard.snapshot()
        assert (snap.reserved, snap.in_flight) == (0, 0), snap
        reads = fake.balance_requests
        with guard.spend(29000):  # nothing in flight stands in the way
            pass
        assert fake.balance_requests == reads + 1, (reads, fake.balance_requests)  # read afresh
        # ann's window: her 100 spent, and the 500 in flight in the parent counted as
        # spent (its outcome is out of the child's sight): 400 left, not waited for.
        assert guard.usage("ann").spent == 600, guard.usage("ann")
        try:
            with guard.spend(401, subject="ann"):
                pass
        except AllowanceExceeded as exc:
            assert exc.remaining == 400, exc
        else:
            raise AssertionError("ann's 401 credits were admitted")
        with guard.spend(400, subject="ann"):
            pass
        other = guard.for_key("lm-other-" + "0" * 24)  # the backend's own lock
        assert other.snapshot().in_flight == 0
    except BaseException as exc:
        print("child:", repr(exc), flush=True)
        code = 1
    os._exit(code)
_, status = os.waitpid(pid, 0)
assert os.waitstatus_to_exitcode(status) == 0, status
leave.set()
print("ok")
"""


def test_the_child_has_no_calls_in_flight_of_the_parents() -> None:
    _run(MEMORY)
