"""ClusterExecutor across two "hosts": each dask worker runs in a network namespace the test makes
(a veth pair into a bridge in this namespace), with its own empty working directory and only
ringpool on its path; the user's package exists only here, on the client. Ships a package, reloads
it, kills a worker mid-map. Skips (with the reason) where namespaces cannot be made."""
import os
import shutil
import subprocess
import sys
import uuid

import pytest

pytest.importorskip("distributed")

import ringpool  # noqa: E402
from ringpool.cluster import ClusterExecutor  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _cluster_tasks  # noqa: E402
import _dask_procs as dp  # noqa: E402

pytestmark = pytest.mark.usefixtures("cluster_tasks_registered")


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


class _Net:
    """A bridge here and one namespace per host, each joined to it by a veth pair. close()
    removes all of it (deleting a namespace deletes the veth end inside it, and so the pair)."""

    def __init__(self, hosts):
        tag = uuid.uuid4().hex[:6]
        self.bridge = f"rpbr{tag}"
        self.namespaces, self.veths = [], []
        self.subnet = f"10.{200 + os.getpid() % 50}.{int(tag[:2], 16)}"
        self.gateway = f"{self.subnet}.1"
        try:
            _ip("link", "add", self.bridge, "type", "bridge")
            _ip("addr", "add", f"{self.gateway}/24", "dev", self.bridge)
            _ip("link", "set", self.bridge, "up")
            self.addresses = []
            for i in range(hosts):
                ns, here, there = f"rp-{tag}-{i}", f"rpv{tag}{i}", f"rpw{tag}{i}"
                _ip("netns", "add", ns)
                self.namespaces.append(ns)
                _ip("link", "add", here, "type", "veth", "peer", "name", there)
                self.veths.append(here)
                _ip("link", "set", there, "netns", ns)
                _ip("link", "set", here, "master", self.bridge)
                _ip("link", "set", here, "up")
                addr = f"{self.subnet}.{10 + i}"
                _ip("-n", ns, "addr", "add", f"{addr}/24", "dev", there)
                _ip("-n", ns, "link", "set", there, "up")
                _ip("-n", ns, "link", "set", "lo", "up")
                self.addresses.append(addr)
        except BaseException:
            self.close()
            raise

    def prefix(self, i):
        return ("ip", "netns", "exec", self.namespaces[i])

    def close(self):
        for ns in self.namespaces:
            _ip("netns", "del", ns, check=False)
        for v in self.veths:
            _ip("link", "del", v, check=False)
        _ip("link", "del", self.bridge, check=False)
        self.namespaces, self.veths = [], []


def _namespaces_unavailable():
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    probe = f"rp-probe-{uuid.uuid4().hex[:6]}"
    r = _ip("netns", "add", probe, check=False)
    if r.returncode != 0:
        return f"ip netns add failed: {r.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    r = _ip("link", "add", f"rpp{uuid.uuid4().hex[:6]}", "type", "bridge", check=False)
    if r.returncode != 0:
        return f"cannot make a bridge: {r.stderr.strip()}"
    _ip("link", "del", r.args[3], check=False)
    return None


@pytest.fixture
def two_hosts():
    reason = _namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    net = _Net(2)
    try:
        yield net
    finally:
        net.close()


def _package(root, name, version):
    pkg = root / name
    pkg.mkdir(exist_ok=True)
    (pkg / "__init__.py").write_text(
        f"VERSION = {version}\n"
        "def where(x, scheduler_ip):\n"
        "    import os, socket\n"
        "    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
        "    s.connect((scheduler_ip, 9))\n"
        "    ip = s.getsockname()[0]\n"
        "    s.close()\n"
        "    return (VERSION, x, ip, set(os.listdir('.')) <= {'dask-worker-space'})\n")


@pytest.mark.timeout(240)
def test_two_hosts_ship_reload_and_lose_a_worker(two_hosts, dask_procs, tmp_path):
    net, procs = two_hosts, dask_procs
    _, address = procs.scheduler(host=net.gateway)
    for i in range(2):
        # Each host: its own empty working directory, no user code, ringpool on the path.
        home = tmp_path / f"host{i}"
        home.mkdir()
        procs.worker(address, f"host{i}", prefix=net.prefix(i), cwd=str(home),
                     extra=("--host", net.addresses[i]))
    client_dir = tmp_path / "client"
    client_dir.mkdir()
    name = "rp_netns_pkg"
    _package(client_dir, name, 1)
    mod = ringpool.import_module_from_path(name, client_dir / name)
    try:
        with ClusterExecutor(address, processes_per_worker=1) as ex:
            workers = dp.wait_workers(ex.client, 2)
            assert sorted(w.split("//")[1].split(":")[0] for w in workers) == sorted(net.addresses)
            out = list(ex.map(mod.where, range(64), [net.gateway] * 64, chunksize=1))
            assert [o[:2] for o in out] == [(1, i) for i in range(64)]
            assert {o[2] for o in out} <= set(net.addresses) and all(o[3] for o in out)
            # Each host got the package, once (where chunks ran is dask's choice).
            stats = ex.cluster_stats()
            for addr, s in stats.items():
                assert [v for k, v in s["received"].items() if k.startswith(name + ":")] == [1], addr

            _package(client_dir, name, 2)
            mod = ringpool.reload(name)
            out = list(ex.map(mod.where, range(64), [net.gateway] * 64, chunksize=2))
            assert [o[:2] for o in out] == [(2, i) for i in range(64)]  # the new version, everywhere

            marker = str(tmp_path / "killed-once")
            out = list(ex.map(_cluster_tasks._kill_my_dask_worker_once, range(120), [marker] * 120, [40] * 120,
                              chunksize=4))
            assert out == [3 * i for i in range(120)]
            assert os.path.exists(marker)
    finally:
        ringpool.modules.purge(name)

