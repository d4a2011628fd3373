"""The example JSON service (examples/json_service) against hostile clients, over loopback only.

Each test starts the service binary itself (``Service``) with the limits it exercises and stops it
with SIGTERM, checking that it exits and that none of its workers outlives it. The happy path
and a worker SIGKILLed under load are examples/json_service/drive.py's (ctest example.json_service).
docs/design/security.md ("The example service") lists the checks tested here.
"""
import asyncio
import contextlib
import json
import os
import resource
import select
import signal
import socket
import subprocess
import threading
import time

import pytest

from conftest import BINDINGS, alive

ROOT = os.path.dirname(BINDINGS)
BINARY = os.path.join(os.environ.get("RINGPOOL_BUILD_DIR", os.path.join(ROOT, "build")), "examples", "json_service")
TEXTJOBS = os.path.join(ROOT, "examples", "json_service", "tasks", "textjobs")


def fib(n):
    a, b = 0, 1
    for _ in range(n):
        a, b = b, a + b
    return a


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def socket_count(pid):
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
    return n


def holds_connection(pid, client):
    """Whether process pid still has a descriptor for the service's end of client's connection
    (its /proc/net/tcp entry, matched by ports, has an inode among pid's sockets)."""
    here, there = client.getsockname()[1], client.getpeername()[1]
    ours = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(FileNotFoundError):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                ours.add(int(link[8:-1]))
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            local, remote, inode = int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16), int(fields[9])
            if local == there and remote == here and inode in ours:
                return True
    return False


def descendants(pid):
    kids, todo = set(), [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task"):
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):
                new = {int(t) for t in open(f"/proc/{p}/task/{task}/children").read().split()}
                todo += new - kids
                kids |= new
    return kids


class Service:
    """json_service on 127.0.0.1 with textjobs shipped (its EXPORTS allowed) and `flags`."""

    def __init__(self, tmp_path, *flags, prefix=(BINARY,)):
        assert os.path.exists(BINARY), f"{BINARY} is not built: ./run build"
        self.stderr_path = tmp_path / "service.stderr"
        self.proc = subprocess.Popen(
            [*prefix, "--port", "0", "--workers", "2", "--python-path", BINDINGS, "--package", "textjobs=" + TEXTJOBS,
             *flags], stdout=subprocess.PIPE, stderr=open(self.stderr_path, "w"), text=True)
        ready, _, _ = select.select([self.proc.stdout], [], [], 60)
        line = self.proc.stdout.readline() if ready else ""
        if not line.startswith("listening on"):
            self.proc.kill()
            self.proc.wait(10)
            pytest.fail(f"the service did not start: {line!r} {self.stderr()}")
        self.port = int(line.rsplit(":", 1)[1])
        self.workers = descendants(self.proc.pid)

    def stderr(self):
        return self.stderr_path.read_text()

    def connect(self, timeout=30):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        return s

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
                pytest.fail("the service did not stop on SIGTERM within 30 s")
        deadline = time.monotonic() + 10
        while any(alive(p) for p in self.workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not [p for p in self.workers if alive(p)], "workers outlived the service"


@contextlib.contextmanager
def service(tmp_path, *flags, prefix=(BINARY,)):
    s = Service(tmp_path, *flags, prefix=prefix)
    try:
        yield s
    finally:
        if s.proc.poll() is None:
            s.stop()
        else:
            s.proc.wait(10)


class Client:
    def __init__(self, svc, timeout=30):
        self.sock = svc.connect(timeout)
        self.file = self.sock.makefile("rb")

    def send_line(self, data: bytes):
        self.sock.sendall(data + b"\n")

    def call(self, fn, *args, id=1):
        self.send_line(json.dumps({"id": id, "fn": fn, "args": list(args)}).encode())
        return self.recv()

    def recv(self):
        line = self.file.readline()
        assert line, "the service closed the connection"
        return json.loads(line)

    def closed_by_peer(self):
        """True once the service has closed the connection (the replies before are discarded)."""
        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def close(self):
        self.file.close()
        self.sock.close()


def test_only_allowed_functions_run(tmp_path):
    marker = tmp_path / "pwned"
    with service(tmp_path, "--allow", "json:dumps") as svc:
        c = Client(svc)
        # os:system must be refused without being imported or run: the marker never appears.
        for fn in ("os:system", "textjobs:os.system", "textjobs:no_such", "textjobs.counting:collections.Counter",
                   "json:loads", "subprocess:run"):
            r = c.call(fn, f"touch {marker}")
            assert r == {"id": 1, "ok": False,
                         "error": {"type": "NotAllowed",
                                   "message": f"function '{fn}' is not allowed by this service"}}, r
        time.sleep(0.5)
        assert not marker.exists()
        # What EXPORTS lists ("word_count", "counting:count") and what --allow names do run.
        assert c.call("textjobs:word_count", "a b a")["result"] == {"a": 2, "b": 1}
        assert c.call("textjobs.counting:count", "x y x")["result"] == {"x": 2, "y": 1}
        assert c.call("json:dumps", [1, 2])["result"] == "[1, 2]"
        c.close()


def test_package_without_exports_exports_nothing(tmp_path):
    pkg = tmp_path / "quiet"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("def hello():\n    return 'hi'\n")
    with service(tmp_path, "--package", f"quiet={pkg}") as svc:
        c = Client(svc)
        assert c.call("quiet:hello")["error"]["type"] == "NotAllowed"
        assert c.call("textjobs:fib", 10)["result"] == 55
        c.close()
    assert "has no EXPORTS" in svc.stderr()


def test_bad_allow_specs_are_refused_at_start(tmp_path):
    for spec in ("os", "os:", ":system", "os:system;rm", "os:sys tem", "1os:system"):
        r = subprocess.run([BINARY, "--allow", spec], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "not a \"module:function\" name" in r.stderr, (spec, r.stderr)


MALFORMED = [
    b"{not json",
    b'{"id": 1, "fn": "textjobs:fib", "args": [1]',              # truncated
    b'{"id": 1, "fn": "textjobs:fib", "args": [1]} trailing',
    b"[1, 2]",                                                   # not an object
    b'"textjobs:fib"',
    b'{"fn": 5}',                                                # wrong types
    b'{"args": [1]}',
    b'{"fn": "textjobs:fib", "args": {"n": 1}}',
    b'{"fn": "textjobs:fib", "kwargs": [1]}',
    b'{"fn": "textjobs:fib", "fn": "os:system"}',                # duplicate key
    b'{"fn": "textjobs:fib", "args": [99999999999999999999]}',   # integer past int64
    b'{"fn": "textjobs:word_count", "args": ["\xff\xfe"]}',      # not UTF-8
    b'{"fn": "textjobs:word_count", "args": ["\\ud800"]}',       # lone surrogate
    b'{"fn": "textjobs:word_count", "args": ["a\x00b"]}',        # raw control character
    b"[" * 65 + b"]" * 65,                                       # nesting past 64
    b"[" * 200_000 + b"]" * 200_000,
    b'{"a":' * 100_000,
    b"\x00\x01\x02",
]


def test_malformed_json_is_answered_not_fatal(tmp_path):
    with service(tmp_path) as svc:
        c = Client(svc)
        for i, line in enumerate(MALFORMED):
            c.send_line(line)
            r = c.recv()
            assert r["ok"] is False and r["error"]["type"] == "BadRequest", (line[:60], r)
            # The connection goes on after each.
            assert c.call("textjobs:fib", i, id=i) == {"id": i, "ok": True, "result": fib(i)}
        # The deepest document allowed still works.
        c.send_line(b'{"id": 0, "fn": "textjobs:word_count", "args": [' + b"[" * 62 + b"]" * 62 + b"]}")
        assert c.recv()["error"]["type"] == "AttributeError"  # a list has no split(): the worker's answer
        # A request the stream ends inside: answered, then the connection closes.
        c.sock.sendall(b'{"id": 5, "fn": "textjobs:fib", "args": [')
        c.sock.shutdown(socket.SHUT_WR)
        r = c.recv()
        assert r["error"]["type"] == "BadRequest" and "truncated" in r["error"]["message"]
        assert c.file.readline() == b""
        c.close()
        # HTTP (a browser posting to the port): refused, and the body after the headers never runs.
        marker = tmp_path / "from-browser"
        h = Client(svc)
        body = json.dumps({"id": 1, "fn": "textjobs:fib", "args": [1]}).encode()
        h.sock.sendall(b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: text/plain\r\n\r\n" + body + b"\n")
        r = h.recv()
        assert r["error"]["type"] == "BadRequest" and "HTTP" in r["error"]["message"]
        assert h.file.readline() == b""  # closed: no answer to the body
        h.close()
        assert not marker.exists()
        assert svc.proc.poll() is None


def test_oversized_request_is_refused_and_its_connection_closed(tmp_path):
    with service(tmp_path, "--max-request-bytes", "4096") as svc:
        ok = Client(svc)
        text = "w " * 1900
        assert ok.call("textjobs:word_count", text)["result"] == {"w": 1900}  # under the cap
        for payload in (b'{"fn": "textjobs:word_count", "args": ["' + b"x" * 5000 + b'"]}\n',  # a long line
                        b"[" + b"1," * 500_000):                                             # no newline at all
            big = Client(svc)
            with contextlib.suppress(ConnectionResetError, BrokenPipeError):
                big.sock.sendall(payload)
            r = big.recv()
            assert r == {"id": None, "ok": False,
                         "error": {"type": "RequestTooLarge", "message": "a request is at most 4096 bytes"}}
            assert big.closed_by_peer()
            big.close()
        assert ok.call("textjobs:fib", 20)["result"] == 6765
        ok.close()


def test_thousand_concurrent_connections_over_a_cap_of_fifty(tmp_path):
    n, cap = 1000, 50
    with service(tmp_path, "--max-connections", str(cap)) as svc:
        base = socket_count(svc.proc.pid)
        peak = [0]
        done = threading.Event()

        def sample():
            while not done.is_set():
                with contextlib.suppress(FileNotFoundError):
                    peak[0] = max(peak[0], socket_count(svc.proc.pid) - base)
                time.sleep(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()

        async def one(i):
            r, w = await asyncio.open_connection("127.0.0.1", svc.port)
            w.write(json.dumps({"id": i, "fn": "textjobs:fib", "args": [i % 90]}).encode() + b"\n")
            await w.drain()
            line = await r.readline()
            w.close()
            await w.wait_closed()
            return json.loads(line)

        async def all_of_them():
            return await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), 100)

        try:
            t0 = time.monotonic()
            replies = asyncio.run(all_of_them())
            elapsed = time.monotonic() - t0
        finally:
            done.set()
            sampler.join()
        assert [r["id"] for r in replies] == list(range(n))
        assert all(r["ok"] and r["result"] == fib(r["id"] % 90) for r in replies), [r for r in replies if not r["ok"]][:3]
        # The excess waited in the listen backlog: the service never held more than the cap.
        assert 0 < peak[0] <= cap, f"peak of {peak[0]} connections over a cap of {cap}"
        print(f"{n} connections, cap {cap}: all answered in {elapsed:.2f} s, peak {peak[0]} connections")


def test_slowloris_is_closed_while_others_are_served(tmp_path):
    idle = 1.0
    with service(tmp_path, "--idle-timeout", str(idle)) as svc:
        t0 = time.monotonic()
        silent = Client(svc, timeout=0.1)
        loris = Client(svc, timeout=0.1)
        patient = Client(svc)
        patient.send_line(json.dumps({"id": 9, "fn": "textjobs:slow", "args": [2.5 * idle]}).encode())
        busy = Client(svc)
        request = b'{"id": 1, "fn": "textjobs:fib", "args": [10]'
        closed = {}
        i = answered = 0
        while time.monotonic() - t0 < 3.5 * idle:
            if "loris" not in closed:  # a byte at a time, never a newline
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    loris.sock.send(request[i % len(request):i % len(request) + 1])
                i += 1
            for name, c in (("silent", silent), ("loris", loris)):
                if name not in closed and c.closed_by_peer():
                    closed[name] = time.monotonic() - t0
            assert busy.call("textjobs:fib", 10)["result"] == 55
            answered += 1
        assert set(closed) == {"silent", "loris"}, closed
        for name, at in closed.items():
            assert idle <= at <= 2 * idle + 0.5, f"{name} closed after {at:.2f} s (idle timeout {idle} s)"
        assert answered > 10
        # Owed a reply, the patient client is not idle: it gets its answer after the timeout.
        r = patient.recv()
        assert r["id"] == 9 and r["ok"], r
        for c in (silent, loris, patient, busy):
            c.close()


def send_until_stuck(sock, data, limit, patience=1.0, deadline=60):
    """Sends data again and again without reading, until the socket takes nothing for `patience`
    seconds or `limit` bytes went; returns (bytes sent, whether it got stuck)."""
    sock.setblocking(False)
    sent, stuck_since, t0 = 0, None, time.monotonic()
    while sent < limit and time.monotonic() - t0 < deadline:
        try:
            sent += sock.send(data)
            stuck_since = None
        except BlockingIOError:
            stuck_since = stuck_since or time.monotonic()
            if time.monotonic() - stuck_since > patience:
                return sent, True
            time.sleep(0.01)
        except (ConnectionResetError, BrokenPipeError):
            return sent, True  # closed by the service
    return sent, False


def test_backpressure_stops_reading_from_a_client_with_replies_pending(tmp_path):
    with service(tmp_path, "--max-pending", "4") as svc:
        greedy = svc.connect()
        # Slow tasks: a service without backpressure would read (and queue) all of it at once.
        line = json.dumps({"id": "x" * 1000, "fn": "textjobs:slow", "args": [2]}).encode() + b"\n"
        sent, stuck = send_until_stuck(greedy, line * 1000, limit=256 << 20)
        # Only the socket buffers (a few MB) took requests: the service stopped reading.
        assert stuck and sent < 32 << 20, f"the service read {sent >> 20} MB"
        other = Client(svc)
        assert other.call("textjobs:fib", 30)["result"] == 832040  # others are served meanwhile
        other.close()
        greedy.close()


def status_kib(pid, field):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def pump(socks, data, deadline):
    """Sends data on every socket (non-blocking, round robin) until all of it went or the deadline."""
    left = {s: memoryview(data) for s in socks}  # slices without copies
    for s in socks:
        s.setblocking(False)
    while left and time.monotonic() < deadline:
        for s in list(left):
            try:
                n = s.send(left[s][:1 << 20])
                left[s] = left[s][n:]
                if not left[s]:
                    del left[s]
            except BlockingIOError:
                pass
        time.sleep(0.002)
    return not left


def read_replies(sock, n, timeout):
    """n reply lines from sock, parsed (through a socket object of its own: a timeout on `sock`
    would make another thread's sends on it block)."""
    own = sock.dup()
    own.settimeout(timeout)
    f = own.makefile("rb")
    out = []
    for _ in range(n):
        line = f.readline()
        assert line, f"the service closed the connection after {len(out)} of {n} replies: {out}"
        out.append(json.loads(line))
    f.close()
    own.close()
    return out


@pytest.mark.timeout(240)
def test_held_request_bytes_are_bounded_service_wide(tmp_path):
    # 4 connections x 32 requests of ~1 MiB of JSON floats (`1e9,` is 4 bytes of JSON and 9 of
    # pickle) while both workers are busy: --max-pending (64) lets every connection send all of
    # them, so only the service-wide budget bounds what the service holds. Without it the service
    # grew by ~3.7 MiB per request held (its JSON in a buffer, its pickled arguments in the pool and
    # in a worker's call block): 423 MiB measured for these 128 with the budget made huge. With --max-held-bytes 8 MiB it holds at
    # most 8 MiB + one request + one 16 KiB read per connection of JSON, each byte costing at most
    # ~5.5 bytes, plus the parse of the one request being dispatched (security.md, "The example
    # service"): the bound below is the start's VmRSS + 6 x 10 MiB + 32 MiB. Every request is
    # answered.
    budget, conns, per_conn = 8 << 20, 4, 32
    with service(tmp_path, "--max-held-bytes", str(budget)) as svc:
        warm = Client(svc)
        assert warm.call("textjobs:size", [1, 2, 3])["result"] == 3
        base = status_kib(svc.proc.pid, "VmRSS")
        busy = Client(svc, timeout=60)
        busy.send_line(b'{"id": "a", "fn": "textjobs:slow", "args": [6]}\n{"id": "b", "fn": "textjobs:slow", "args": [6]}')
        n_floats = (1 << 20) // 4 - 64
        body = ",".join(["1e9"] * n_floats)
        socks = [svc.connect(timeout=120) for _ in range(conns)]
        data = b"".join(b'{"id": %d, "fn": "textjobs:size", "args": [[%s]]}\n' % (i, body.encode())
                        for i in range(per_conn))
        got = {}

        def reader(k, s):
            got[k] = read_replies(s, per_conn, timeout=180)

        readers = [threading.Thread(target=reader, args=(k, s)) for k, s in enumerate(socks)]
        for t in readers:
            t.start()
        assert pump(socks, data, time.monotonic() + 180), "the service stopped reading for good"
        for t in readers:
            t.join(200)
        assert sorted(busy.recv()["id"] for _ in range(2)) == ["a", "b"]
        peak = status_kib(svc.proc.pid, "VmHWM")
        for k in range(conns):
            replies = got.get(k)
            assert replies is not None, f"connection {k} got no replies"
            assert sorted(r["id"] for r in replies) == list(range(per_conn)), replies[:2]
            assert all(r["ok"] and r["result"] == n_floats for r in replies), [r for r in replies if not r["ok"]][:2]
        bound = base + (6 * (budget + (2 << 20)) + (32 << 20)) // 1024
        print(f"VmRSS at start {base >> 10} MiB, peak {peak >> 10} MiB, bound {bound >> 10} MiB "
              f"({conns * per_conn} requests of {len(data) // per_conn >> 10} KiB)")
        assert peak <= bound, f"peak VmRSS {peak >> 10} MiB over the bound of {bound >> 10} MiB"
        for s in socks:
            s.close()
        busy.close()
        warm.close()


@pytest.mark.timeout(120)
def test_partial_requests_that_spend_the_budget_are_still_completed(tmp_path):
    # Eight clients each send the first 32 KiB of a 48 KiB request, then pause: the budget (64 KiB)
    # is spent by partial requests with no task in the pool, so no task will ever give bytes back.
    # One waiting connection at a time may read on to complete its request (the finisher); without
    # that rule the service would wait for ever. Every request is answered.
    limit = 64 << 10
    with service(tmp_path, "--max-held-bytes", str(limit + 4096), "--max-request-bytes", str(limit),
                 "--max-reply-bytes", "4096") as svc:
        items = ["x" * 100] * 400
        line = json.dumps({"fn": "textjobs:size", "args": [items]}).encode() + b"\n"
        assert 40 << 10 < len(line) < limit
        clients = [Client(svc, timeout=60) for _ in range(8)]
        for c in clients:
            c.sock.sendall(line[:32 << 10])
        time.sleep(1.0)
        for c in clients:
            c.sock.sendall(line[32 << 10:])
        for c in clients:
            assert c.recv() == {"id": None, "ok": True, "result": 400}
        # And the service goes on as usual.
        for c in clients:
            assert c.call("textjobs:fib", 10)["result"] == 55
            c.close()


def test_a_budget_smaller_than_a_request_and_its_reply_is_refused_at_start(tmp_path):
    r = subprocess.run([BINARY, "--max-held-bytes", "3000", "--max-request-bytes", "2000", "--max-reply-bytes", "1001"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert "--max-held-bytes (3000) must be at least --max-request-bytes + --max-reply-bytes (2000 + 1001)" in r.stderr


def test_help_goes_to_stdout_and_an_unknown_option_is_named(tmp_path):
    r = subprocess.run([BINARY, "--help"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.startswith("usage: json_service") and r.stderr == "", r
    r = subprocess.run([BINARY, "--bogus"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and r.stderr.startswith("json_service: unknown option --bogus\nusage:"), r.stderr


BIG_REPLIES = os.path.join(ROOT, "tests", "python", "hostile_pkgs", "big_replies")


def test_a_reply_over_its_cap_is_refused_and_the_connection_goes_on(tmp_path):
    with service(tmp_path, "--max-reply-bytes", "100000", "--package", "big_replies=" + BIG_REPLIES) as svc:
        c = Client(svc)
        got = c.call("big_replies:text", 50_000, id="fits")
        assert got["ok"] and got["result"] == "x" * 50_000
        # Refused from the lower bound on its JSON (not built); from the line built (an escape is
        # 6 bytes of JSON per byte of the str); an error reply is capped too; and by the worker,
        # not sent, over 4x the cap (the pool's max_result_bytes: the service never decodes it).
        for fn, n in (("big_replies:text", 200_000), ("big_replies:escapes", 20_000), ("big_replies:error", 200_000),
                      ("big_replies:text", 500_000), ("big_replies:error", 500_000)):
            got = c.call(fn, n, id=fn)
            assert got["id"] == fn and not got["ok"], str(got)[:200]
            assert got["error"]["type"] == "ReplyTooLarge", got
            assert "100000 bytes" in got["error"]["message"], got
        assert c.call("big_replies:escapes", 10_000)["result"] == "\x01" * 10_000  # ~60 KB of JSON: fits
        assert c.call("textjobs:fib", 10)["result"] == 55
        c.close()


@pytest.mark.timeout(180)
def test_replies_a_client_does_not_read_are_held_within_the_budget(tmp_path):
    # A client sends 64 small requests, each answered by ~0.9 MiB of JSON, and reads nothing.
    # Before replies counted in the budget the service held all of them (VmRSS 8 -> 99 MiB,
    # measured); now each task in the pool reserves --max-reply-bytes of --max-held-bytes, and a
    # reply holds its bytes until written: at most 8 MiB of replies and reservations at once
    # (7 -> 22 MiB measured), each reply line made from a result that costs ~3x its size while it
    # is made. Other clients wait for the budget meanwhile, until --idle-timeout closes the client
    # that does not read; then they are served.
    budget, reply = 8 << 20, 1 << 20
    with service(tmp_path, "--max-held-bytes", str(budget), "--max-reply-bytes", str(reply), "--idle-timeout", "3",
                 "--package", "big_replies=" + BIG_REPLIES) as svc:
        warm = Client(svc)
        assert warm.call("big_replies:text", 900_000)["ok"]  # the service's buffers for one reply exist
        base = status_kib(svc.proc.pid, "VmRSS")
        greedy = svc.connect()
        greedy.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # its socket takes little
        lines = b"".join(b'{"id": %d, "fn": "big_replies:text", "args": [900000]}\n' % i for i in range(64))
        greedy.sendall(lines)
        time.sleep(2.0)  # the service answers what the budget lets it, and the writes stall
        t0 = time.monotonic()
        other = Client(svc, timeout=60)
        got = other.call("textjobs:fib", 20)
        waited = time.monotonic() - t0
        assert got["result"] == 6765
        peak = status_kib(svc.proc.pid, "VmHWM")
        bound = base + (3 * budget + (16 << 20)) // 1024
        print(f"VmRSS at start {base >> 10} MiB, peak {peak >> 10} MiB, bound {bound >> 10} MiB; "
              f"the other client waited {waited:.1f} s")
        assert peak <= bound, f"peak VmRSS {peak >> 10} MiB over the bound of {bound >> 10} MiB"
        other.close()
        # The service closed the client that does not read (not drained here: what the kernel
        # still holds for it would take minutes through its small window).
        deadline = time.monotonic() + 15
        while holds_connection(svc.proc.pid, greedy) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not holds_connection(svc.proc.pid, greedy), "the client that does not read was not closed"
        warm.close()
        greedy.close()


@pytest.mark.timeout(180)
def test_a_client_reading_its_replies_slowly_does_not_keep_the_budget_from_others(tmp_path):
    # A client buffers 40 requests for ~1 MiB replies and reads them slowly (a reply every 1.5 s,
    # inside --idle-timeout). Each reply it takes frees room; that room went to its own next
    # buffered request at once, so an honest client waited for all 40 (32 s measured with 40,
    # 22 s with 20). Now room goes to the sessions waiting for it first, oldest first: the honest
    # client waits for about one of the slow client's replies.
    reply = 1 << 20
    with service(tmp_path, "--max-held-bytes", str(8 << 20), "--max-reply-bytes", str(reply), "--idle-timeout", "3",
                 "--package", "big_replies=" + BIG_REPLIES) as svc:
        slow = socket.socket()
        slow.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        slow.connect(("127.0.0.1", svc.port))
        slow.sendall(b"".join(b'{"id": %d, "fn": "big_replies:text", "args": [1000000]}\n' % i for i in range(40)))
        stop = threading.Event()

        def trickle():
            slow.settimeout(1.0)
            while not stop.is_set():
                got = 0
                with contextlib.suppress(socket.timeout, OSError):
                    while got < 1_000_000 and not stop.is_set():
                        data = slow.recv(65536)
                        if not data:
                            return
                        got += len(data)
                stop.wait(1.5)

        reader = threading.Thread(target=trickle)
        reader.start()
        try:
            time.sleep(2.0)
            t0 = time.monotonic()
            honest = Client(svc, timeout=60)
            assert honest.call("big_replies:text", 5)["result"] == "xxxxx"
            waited = time.monotonic() - t0
            print(f"the honest client waited {waited:.1f} s")
            assert waited < 12, f"the honest client waited {waited:.1f} s behind the slow reader's requests"
            honest.close()
        finally:
            stop.set()
            reader.join(10)
            slow.close()


@pytest.mark.timeout(180)
def test_the_finisher_starts_one_request_not_all_it_buffered(tmp_path):
    # Ten connections fill the budget with partial requests (nothing in the pool): one of them
    # becomes the finisher, which may read on and start its request. Each then completes its
    # request and sends 200 more for ~1 MiB replies in the same packet, reading nothing. The
    # finisher used to start every complete line of that read (up to --max-pending, each with a
    # 1 MiB reservation and then a 1 MiB reply): peak VmRSS 12 -> 122 MiB measured, against 27 MiB
    # when the 200 come a second later. Now it starts its one request and waits like the others.
    budget = 8 << 20
    with service(tmp_path, "--max-held-bytes", str(budget), "--idle-timeout", "15",
                 "--package", "big_replies=" + BIG_REPLIES) as svc:
        warm = Client(svc)
        assert warm.call("big_replies:text", 900_000)["ok"]
        base = status_kib(svc.proc.pid, "VmRSS")
        socks = []
        for _ in range(10):
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(("127.0.0.1", svc.port))
            s.sendall(b'{"id": 0, "fn": "big_replies:text", "args": [5], "pad": "' + b"x" * 1_000_000)
            socks.append(s)
        time.sleep(1.0)
        more = b"".join(b'{"id": %d, "fn": "big_replies:text", "args": [1000000]}\n' % i for i in range(1, 201))
        for s in socks:
            s.sendall(b'"}\n' + more)
        time.sleep(3.0)
        peak = status_kib(svc.proc.pid, "VmHWM")
        bound = base + (3 * budget + (16 << 20)) // 1024
        print(f"VmRSS at start {base >> 10} MiB, peak {peak >> 10} MiB, bound {bound >> 10} MiB")
        assert peak <= bound, f"peak VmRSS {peak >> 10} MiB over the bound of {bound >> 10} MiB"
        for s in socks:
            s.close()
        warm.close()


def test_client_that_does_not_read_its_replies_is_closed(tmp_path):
    with service(tmp_path, "--idle-timeout", "2") as svc:
        base = socket_count(svc.proc.pid)  # not fds: the pool keeps memfd blocks for large payloads
        greedy = svc.connect()
        # Large replies (a dict of 60,000 words) fill the socket buffers within a few requests.
        text = " ".join(f"w{i}" for i in range(60_000))
        line = json.dumps({"id": 1, "fn": "textjobs:word_count", "args": [text]}).encode() + b"\n"
        send_until_stuck(greedy, line, limit=64 << 20, deadline=5)
        # Its write stalls for the idle timeout: the service closes it while it is still open here.
        deadline = time.monotonic() + 15
        while socket_count(svc.proc.pid) > base and time.monotonic() < deadline:
            time.sleep(0.1)
        assert socket_count(svc.proc.pid) == base, "the stalled connection was not closed"
        other = Client(svc)
        assert other.call("textjobs:fib", 12)["result"] == 144
        other.close()
        greedy.close()


def test_accept_survives_fd_exhaustion(tmp_path):
    with service(tmp_path, "--max-connections", "1000", "--idle-timeout", "60", "--accept-backoff-ms", "50") as svc:
        # Room for a few connections only, under a limit lowered once the pool runs (it needs its
        # own fds to start).
        room = 6
        # Once the workers run (a pool that cannot start one fails its tasks with PoolClosed).
        warm = Client(svc)
        assert warm.call("textjobs:fib", 1)["result"] == 1
        warm.close()
        settle = time.monotonic() + 30
        while (svc.workers != descendants(svc.proc.pid) or len(svc.workers) < 3) and time.monotonic() < settle:
            svc.workers = descendants(svc.proc.pid)
            time.sleep(0.2)
        time.sleep(0.5)
        resource.prlimit(svc.proc.pid, resource.RLIMIT_NOFILE, (fd_count(svc.proc.pid) + room,) * 2)
        hogs = [Client(svc) for _ in range(room + 10)]  # beyond the room they wait in the backlog
        deadline = time.monotonic() + 10
        while "Too many open files" not in svc.stderr() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "accept: Too many open files" in svc.stderr()
        late = Client(svc, timeout=1.0)
        late.send_line(json.dumps({"id": 7, "fn": "textjobs:fib", "args": [7]}).encode())
        with pytest.raises(socket.timeout):
            late.file.readline()  # not accepted: no fd to accept it with
        for h in hogs:
            h.close()
        late.sock.settimeout(20)
        late.file = late.sock.makefile("rb")
        assert late.recv() == {"id": 7, "ok": True, "result": 13}
        assert "accepting again" in svc.stderr()
        fresh = Client(svc)
        assert fresh.call("textjobs:fib", 8)["result"] == 21
        fresh.close()
        late.close()
        assert svc.proc.poll() is None


PROC_PEERS = os.path.join(ROOT, "tests", "python", "hostile_pkgs", "proc_peers")


@pytest.mark.skipif(os.geteuid() != 0, reason="runs the service as user nobody (setpriv): needs root")
@pytest.mark.timeout(180)
def test_a_task_cannot_reach_the_service_or_other_workers_through_proc(tmp_path):
    # Workers run as the service's user. Were the service or a worker dumpable, a task could open
    # every worker's ring memfd through /proc/<service>/fd (and forge other workers' answers),
    # another worker's through /proc/<worker>/fd, and write code into /proc/<service>/mem. Run as
    # nobody (root's CAP_SYS_PTRACE passes every such check, so only a second user shows it).
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
              "--bounding-set=-all", BINARY]
    with service(tmp_path, "--workers", "3", "--package", "proc_peers=" + PROC_PEERS, prefix=nobody) as svc:
        got = Client(svc, timeout=60).call("proc_peers:steal", os.path.basename(BINARY)[:15])
        assert got["ok"], got
        r = got["result"]
        assert r["service_pid"] == svc.proc.pid
        assert len(r["other_workers"]) >= 2, r  # the zygote and two other workers were looked at
        assert r["service_fds_opened"] == [], r
        assert r["service_mem_writable"] is not True, r
        assert all(v == [] for v in r["other_workers"].values()), r
        # Nor ptrace the zygote (and tamper with the workers it forks later) or another worker.
        children = {p for p in descendants(svc.proc.pid)  # the zygote (its workers are its children)
                    if open(f"/proc/{p}/stat").read().rsplit(")", 1)[1].split()[1] == str(svc.proc.pid)}
        assert children - {r["me"]} <= set(r["peers_examined"]) and len(r["peers_examined"]) >= 3, (children, r)
        assert r["peers_mem_writable"] == [], r
