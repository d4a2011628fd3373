"""Attack (not part of the suite): one client makes examples/json_service hold
max_connections x max_pending x (a request's pickled arguments) bytes of queued tasks.

Each connection sends `max_pending` requests for an allowed function (textjobs:slow, which keeps
both workers busy), each carrying ~1 MiB of JSON floats (`1e9,` is 4 bytes of JSON and 9 of
pickle: BINFLOAT). The service keeps every request's pickled arguments until a worker takes it,
so its memory grows to about connections x pending x 2.3 MiB; with the defaults (256 x 64) that
is ~37 GiB from a single local client. Prints the service's VmRSS before and after.

Since --max-held-bytes (default 64 MiB, security.md "The example service", item 7) the service
stops reading while that many request bytes are held: 4 x 64 went from 956 MiB to 315-327 MiB, and
the figure no longer grows with the number of connections (16 x 64: 328 MiB).

usage: /usr/bin/python3 tests/attacks/json_service_memory.py [connections] [pending]
(run from the worktree, after ./run build)
"""
import os
import select
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(os.environ.get("RINGPOOL_BUILD_DIR", os.path.join(ROOT, "build")), "examples", "json_service")
TEXTJOBS = os.path.join(ROOT, "examples", "json_service", "tasks", "textjobs")


def rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return -1


def main():
    conns = int(sys.argv[1]) if len(sys.argv) > 1 else 8
    pending = int(sys.argv[2]) if len(sys.argv) > 2 else 64
    proc = subprocess.Popen([BINARY, "--port", "0", "--workers", "2", "--python-path", os.path.join(ROOT, "bindings"),
                             "--package", "textjobs=" + TEXTJOBS, "--max-pending", str(pending)],
                            stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("listening on"), line
        port = int(line.rsplit(":", 1)[1])
        before = rss_mib(proc.pid)
        big = "[" + ",".join(["1e9"] * ((1 << 20) // 4 - 16)) + "]"
        req = ('{"fn": "textjobs:slow", "args": [600, ' + big + ']}\n').encode()
        busy = socket.create_connection(("127.0.0.1", port))
        busy.sendall(b'{"fn": "textjobs:slow", "args": [600]}\n' * 2)  # both workers busy
        socks = []
        for _ in range(conns):
            s = socket.create_connection(("127.0.0.1", port))
            s.setblocking(False)
            socks.append([s, req * pending])
        deadline = time.monotonic() + 120
        while any(b for _, b in socks) and time.monotonic() < deadline:
            for item in socks:
                try:
                    if item[1]:
                        item[1] = item[1][item[0].send(item[1][:1 << 20]):]
                except BlockingIOError:
                    pass
            time.sleep(0.001)
        time.sleep(3)
        after = rss_mib(proc.pid)
        print(f"{conns} connections x {pending} pending requests of {len(req) >> 10} KiB: "
              f"service VmRSS {before} MiB -> {after} MiB")
    finally:
        proc.kill()
        proc.wait(30)


if __name__ == "__main__":
    main()
