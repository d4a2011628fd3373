#!/usr/bin/python3
"""Drive the example JSON service: start it, send requests (some bad, some refused by the
allow-list), SIGKILL a worker under load, check every request is answered and only the victim's
request failed, then stop it. tests/python/test_json_service.py tests its limits.

    drive.py PATH/TO/json_service SOURCE_DIR      (exit 0 on success)
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time


def fail(msg):
    print(f"FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] not in "ZX"
    except (FileNotFoundError, ProcessLookupError):
        return False


class Client:
    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.file = self.sock.makefile("rb")
        self.next_id = 0

    def send(self, fn, *args, raw=None, **kwargs):
        self.next_id += 1
        line = raw if raw is not None else json.dumps({"id": self.next_id, "fn": fn, "args": list(args),
                                                        "kwargs": kwargs})
        self.sock.sendall(line.encode() + b"\n")
        return self.next_id

    def recv(self):
        line = self.file.readline()
        if not line:
            fail("the service closed the connection")
        return json.loads(line)

    def call(self, fn, *args, **kwargs):
        rid = self.send(fn, *args, **kwargs)
        reply = self.recv()
        if reply.get("id") != rid:
            fail(f"reply for {reply.get('id')}, expected {rid}")
        return reply


def main():
    binary, src = sys.argv[1], sys.argv[2]
    proc = subprocess.Popen(
        [binary, "--port", "0", "--workers", "2", "--python-path", os.path.join(src, "bindings"),
         "--package", "textjobs=" + os.path.join(src, "examples", "json_service", "tasks", "textjobs")],
        stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        line = proc.stdout.readline()
        if not line.startswith("listening on") or time.monotonic() > deadline:
            fail(f"service did not start: {line!r}")
        port = int(line.rsplit(":", 1)[1])
        c = Client(port)

        r = c.call("textjobs:word_count", "the cat and the hat")
        if r != {"id": 1, "ok": True, "result": {"the": 2, "cat": 1, "and": 1, "hat": 1}}:
            fail(f"word_count: {r}")
        r = c.call("textjobs:fib", 90)
        if r["result"] != 2880067194370816120:
            fail(f"fib: {r}")
        r = c.call("textjobs:fail", "nope")
        if r["ok"] or r["error"]["type"] != "ValueError" or r["error"]["message"] != "nope":
            fail(f"fail: {r}")
        # Only what the package's EXPORTS lists may be called (tasks/textjobs/EXPORTS).
        for fn in ("textjobs:no_such", "os:system", "textjobs:os.system"):
            r = c.call(fn, "true")
            if r["ok"] or r["error"]["type"] != "NotAllowed" or fn not in r["error"]["message"]:
                fail(f"{fn} was not refused: {r}")
        c.send(None, raw="{not json")
        r = c.recv()
        if r["ok"] or r["error"]["type"] != "BadRequest":
            fail(f"bad JSON: {r}")

        # Under load: 300 requests in flight across two connections; one worker is SIGKILLed.
        pids = {c.call("textjobs:pid")["result"] for _ in range(20)}
        victim = min(pids)
        c2 = Client(port)
        sent = {}
        for i in range(150):
            sent[("c", c.send("textjobs:slow", 0.01))] = "slow"
            sent[("c2", c2.send("textjobs:fib", i % 90))] = i % 90
        time.sleep(0.3)
        os.kill(victim, signal.SIGKILL)
        died = 0
        for conn, name in ((c, "c"), (c2, "c2")):
            for _ in range(150):
                r = conn.recv()
                want = sent.pop((name, r["id"]), None)
                if want is None:
                    fail(f"unexpected reply {r}")
                if r["ok"]:
                    if want != "slow":
                        a, b = 0, 1
                        for _ in range(want):
                            a, b = b, a + b
                        if r["result"] != a:
                            fail(f"fib({want}) = {r['result']}")
                elif r["error"]["type"] == "WorkerDied":
                    died += 1
                else:
                    fail(f"unexpected error {r}")
        if sent:
            fail(f"unanswered: {sorted(sent)[:5]}")
        if died > 1:
            fail(f"{died} requests failed with WorkerDied; only the victim's running one may")
        if alive(victim):
            fail("the victim still runs")
        after = {c.call("textjobs:pid")["result"] for _ in range(20)}
        if victim in after:
            fail("the dead worker answered")
        workers = pids | after

        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            fail("the service did not stop on SIGTERM")
        if code != 0:
            fail(f"the service exited with {code}")
        time.sleep(0.2)
        left = [p for p in workers if alive(p)]
        if left:
            fail(f"workers outlived the service: {left}")
        print(f"ok: {len(workers)} workers seen, {died} request(s) lost to the SIGKILLed worker")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


if __name__ == "__main__":
    main()
