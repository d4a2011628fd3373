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
