"""Attack (not part of the suite): a C++ Pool worker reaches the service's and the other workers'
descriptors and the service's memory through /proc, because every process runs as the same user
and is dumpable (no PR_SET_DUMPABLE 0, no separate uid, no sandbox).

Starts examples/json_service with tests/python/hostile_pkgs/proc_peers shipped (its EXPORTS: `steal`, standing
for any task the service does not vouch for) and calls it. The reply lists the service's memfds and
socket ends the task could open read-write (every worker's ring, the receiving ends of the result
sockets), the other workers' ring memfds, and whether /proc/<service>/mem opened read-write (enough
to write code into the service). A worker can also simply kill(2) the service.

usage: /usr/bin/python3 tests/attacks/proc_peers.py   (after ./run build)
"""
import json
import os
import select
import socket
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(os.environ.get("RINGPOOL_BUILD_DIR", os.path.join(ROOT, "build")), "examples", "json_service")
PKG = os.path.join(ROOT, "tests", "python", "hostile_pkgs", "proc_peers")


def main():
    proc = subprocess.Popen([BINARY, "--port", "0", "--workers", "3", "--python-path", os.path.join(ROOT, "bindings"),
                             "--package", "proc_peers=" + PKG], stdout=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], 60)
        line = proc.stdout.readline() if ready else ""
        assert line.startswith("listening on"), line
        port = int(line.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            s.sendall(json.dumps({"id": 1, "fn": "proc_peers:steal", "args": [os.path.basename(BINARY)[:15]]}).encode()
                      + b"\n")
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(1 << 16)
                if not chunk:
                    break
                buf += chunk
        print(json.dumps(json.loads(buf), indent=1))
    finally:
        proc.terminate()
        proc.wait(30)


if __name__ == "__main__":
    main()
