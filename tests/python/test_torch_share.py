"""Recycled shared memory for DataLoader batches in ringpool workers (ringpool/_torch.py)."""
import mmap
import os

import pytest

import ringpool
from ringpool._torch import SharedFilePool

pytestmark = [pytest.mark.timeout(120)]


def _inode(fd):
    return os.fstat(fd).st_ino


def test_a_file_is_reused_only_when_no_other_open_of_it_exists():
    pool = SharedFilePool()
    a = pool.open(100_000)
    assert a is not None
    ino_a = _inode(a)
    b = pool.open(100_000)  # a's file is still open elsewhere (a): another file
    assert _inode(b) != ino_a
    m = mmap.mmap(a, 100_000)
    os.close(a)  # still mapped: still busy
    c = pool.open(100_000)
    assert _inode(c) not in (ino_a, _inode(b))
    m.close()  # now nobody holds a's file
    d = pool.open(100_000)
    assert _inode(d) == ino_a
    for fd in (b, c, d):
        os.close(fd)
    e = pool.open(90_000)  # same size class: one of the three free files
    assert e is not None
    os.close(e)
    pool.close()


def test_pool_respects_its_byte_budget():
    pool = SharedFilePool(max_bytes=256 * 1024)
    held = [pool.open(100_000) for _ in range(3)]
    assert held[0] is not None and held[1] is not None
    assert held[2] is None  # a third 128 KiB file would pass the budget: torch's own path then
    for fd in held[:2]:
        os.close(fd)
    pool.close()


class _Frames:
    """Samples whose every element encodes the index, so a reused buffer would show."""

    def __len__(self):
        return 32 * 40

    def __getitem__(self, i):
        import torch

        from ringpool import _torch

        return torch.full((3, 32, 32), float(i)), len(_torch._pool._files)


@pytest.mark.integration
@pytest.mark.parametrize("recycle", ["1", "0"])
def test_dataloader_batches_are_shared_correct_and_recycled(monkeypatch, recycle):
    torch = pytest.importorskip("torch")
    from torch.utils.data import DataLoader

    monkeypatch.setenv("RINGPOOL_RECYCLE_SHARED", recycle)
    ctx = ringpool.get_context(preload=("torch",))
    kept = []
    files = set()
    for n, (x, f) in enumerate(DataLoader(_Frames(), batch_size=32, num_workers=2, multiprocessing_context=ctx)):
        assert x.is_shared()
        assert torch.equal(x[:, 0, 0, 0], torch.arange(n * 32, n * 32 + 32, dtype=torch.float32))
        files |= set(f.tolist())
        if n % 4 == 0:
            kept.append((n, x))  # held by us: its memory must not be reused under us
    for n, x in kept:  # still intact after 40 batches went through the workers' pools
        assert torch.equal(x[:, 2, 31, 31], torch.arange(n * 32, n * 32 + 32, dtype=torch.float32))
    if recycle == "1":
        # Each worker reused a few files; the batches we keep hold theirs (at most 10 + a few).
        assert 1 <= max(files) <= 16
    else:
        assert files == {0}


# -- a killed worker leaks no torch segment (docs/design/security.md) -------------------------------

def _die_inside_share(path_ready):
    """As a worker SIGKILLed inside torch's share_memory_(): torch has created (and sized) its
    /dev/shm/torch_<pid>_<random>_<n> file and not yet unlinked it."""
    import signal

    fd = os.open(f"/dev/shm/torch_{os.getpid()}_4242_0", os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, 4096)
    with open(path_ready, "w") as f:
        f.write("created")
    os.kill(os.getpid(), signal.SIGKILL)


def _left(pid):
    return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"torch_{pid}_"))


def test_a_worker_killed_inside_share_memory_leaves_no_torch_segment(tmp_path):
    # Before: the name stayed in /dev/shm for good (stress --faults --seed 7 found one).
    ctx = ringpool.get_context()
    p = ctx.Process(target=_die_inside_share, args=(str(tmp_path / "ready"),))
    p.start()
    p.join(60)
    assert p.exitcode == -9
    assert (tmp_path / "ready").read_text() == "created"
    assert _left(p.pid) == []


def test_a_torch_segment_someone_holds_is_kept():
    # Under the file_system strategy a storage lives on under its name while in use: a segment
    # another process (here, this one) has open is not removed, even for a dead pid.
    from ringpool._torch import remove_left_segments

    pid = 2 ** 22 + 17  # above the default pid_max: names no live process would use
    held = f"/dev/shm/torch_{pid}_1_0"
    free = f"/dev/shm/torch_{pid}_1_1"
    other = f"/dev/shm/torch_{pid + 1}_1_0"
    fds = [os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600) for path in (held, free, other)]
    try:
        os.close(fds[1])
        os.close(fds[2])
        os.ftruncate(fds[0], 4096)
        m = mmap.mmap(fds[0], 4096)
        os.close(fds[0])  # only the mapping holds it now
        assert remove_left_segments(pid) == [f"torch_{pid}_1_1"]
        assert os.path.exists(held) and not os.path.exists(free) and os.path.exists(other)
        m.close()
        assert remove_left_segments(pid) == [f"torch_{pid}_1_0"]
    finally:
        for path in (held, free, other):
            if os.path.exists(path):
                os.unlink(path)
