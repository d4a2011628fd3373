"""Code shipping for ``ringpool.ClusterExecutor``: ringpool's registry reaches every dask worker as
worker plugins, once per package version per dask worker (client side; the receiving side is
``_cluster_worker.receive_snapshot``).

::

    client process                                 dask scheduler                dask worker
    ClusterExecutor ─┐                             worker_plugins:               plugin setup():
    ClusterExecutor ─┴► _Shipper (one per           ringpool-package-<name>-<h>  receive_snapshot
                        scheduler in this process) ─► (the last _KEEP_VERSIONS   (bytes kept by hash,
                        registry changed? register   registered per name; later  the versions used
                        the versions the scheduler   joiners get them in their   last per name)
                        does not hold                registration)

- One ``_Shipper`` per scheduler in a client process, shared by every ClusterExecutor (and every
  ``distributed.Client``) there: a second executor ships nothing the first already shipped.
- Plugin names carry the version (``ringpool-package-<name>-<hash16>``), so the scheduler's list
  of plugins says which versions every worker has: a ``_Shipper`` reads it before it registers a
  version and skips what is there (another client process may have shipped it).
- Several versions of one package stay registered (clients in other processes may use other
  versions, tasks submitted before a reload use the older one): a version is unregistered only
  when more than ``_KEEP_VERSIONS`` of its package are, the earliest registered first. Workers keep
  the versions used last, as many, whatever the scheduler holds.
"""
from __future__ import annotations

import collections
import logging
import threading

from distributed.diagnostics.plugin import WorkerPlugin

from . import _cluster_worker, modules
from ._cluster_futures import scheduler_plugins

_log = logging.getLogger("ringpool.cluster")
_PREFIX = "ringpool-package-"
_HASH_CHARS = 16  # of a version's hash in its plugin's name: unique among a package's versions


def _plugin_name(name, hash_):
    return f"{_PREFIX}{name}-{hash_[:_HASH_CHARS]}"


class _SnapshotPlugin(WorkerPlugin):
    """One version of one registered package's sources, for every current and future dask worker."""

    def __init__(self, name, hash_, data):
        self.name = _plugin_name(name, hash_)
        self.data = data

    def setup(self, worker):
        _cluster_worker.receive_snapshot(self.data)


class _BundlePlugin(WorkerPlugin):
    def __init__(self, bundle):
        self.name = f"ringpool-bundle-{bundle.hash[:16]}"
        self.label, self.data = bundle.path, bundle.data

    def setup(self, worker):
        _cluster_worker.receive_bundle(self.label, self.data)


class _PoolPlugin(WorkerPlugin):
    """Lets the dask worker start ringpool workers; shuts its node-local pools down with it."""

    name = "ringpool-pool"

    def setup(self, worker):
        _cluster_worker.prepare(worker.address)

    def teardown(self, worker):
        # Also called when another ClusterExecutor registers this plugin again (dask replaces a
        # plugin of the same name): the pools, shared by every executor, stop only with the worker.
        if getattr(worker.status, "name", "").startswith("clos"):
            _cluster_worker.shutdown_pools()


class _Shipper:
    """What one scheduler's workers have of ringpool's registry, as seen from this process; ships
    the rest. Any thread may call ``ship``."""

    def __init__(self, client):
        self._lock = threading.Lock()
        self._version = -1          # modules.registry_version() at the last look
        self._needs = ()
        self._plugins = set(client.run_on_scheduler(scheduler_plugins))  # held by the scheduler
        self.transfers = collections.Counter()  # package name -> versions registered from this process

    def ship(self, client):
        """Register a plugin for every registered package version the scheduler does not hold.
        Returns the (name, hash) pairs a chunk pickled under the current registry needs."""
        if modules.registry_version() == self._version:
            return self._needs
        with self._lock:
            ver = modules.registry_version()
            snaps = modules.snapshots()
            if any(_plugin_name(s.name, s.hash) not in self._plugins for s in snaps):
                # Another client (process) may have registered it meanwhile, or pruned some.
                self._plugins = set(client.run_on_scheduler(scheduler_plugins))
            for s in snaps:
                plugin = _plugin_name(s.name, s.hash)
                if plugin not in self._plugins:
                    # Returns once every current worker ran setup(): nothing that needs it is
                    # submitted before.
                    client.register_worker_plugin(_SnapshotPlugin(s.name, s.hash, s.to_bytes()))
                    self._plugins.add(plugin)
                    self.transfers[s.name] += 1
                    _log.info("shipped %s %s (%d files) to the cluster", s.name, s.hash[:12], len(s.files))
                    self._prune(client, s.name)
            self._needs = tuple((s.name, s.hash) for s in snaps)
            self._version = ver
            return self._needs

    def ship_bundle(self, client, bundle):
        """Register ``bundle``'s plugin unless the scheduler holds it already."""
        plugin = _BundlePlugin(bundle)
        with self._lock:
            if plugin.name not in self._plugins:
                client.register_worker_plugin(plugin)
                self._plugins.add(plugin.name)
                self.transfers["<bundle>"] += 1

    def _prune(self, client, name):
        """Unregister the earliest registered versions of ``name`` beyond _KEEP_VERSIONS (the
        scheduler lists its plugins in registration order). Workers that have them keep their
        bytes (least recently used dropped first); only workers that join later miss them."""
        prefix = f"{_PREFIX}{name}-"
        held = [p for p in client.run_on_scheduler(scheduler_plugins)
                if p.startswith(prefix) and "-" not in p[len(prefix):]]
        for old in held[:max(0, len(held) - _cluster_worker._KEEP_VERSIONS)]:
            self._plugins.discard(old)
            try:
                client.unregister_worker_plugin(old)
            except Exception as exc:  # gone already (another client pruned it): nothing to undo
                _log.debug("could not unregister %s: %s", old, exc)


_shippers = {}  # scheduler id -> _Shipper
_shippers_lock = threading.Lock()


def shipper(client):
    """The ``_Shipper`` of the scheduler ``client`` talks to (made at the first call)."""
    sid = client.scheduler_info().get("id") or client.scheduler.address
    with _shippers_lock:
        s = _shippers.get(sid)
        if s is None:
            s = _shippers[sid] = _Shipper(client)
        return s
