"""A task that reaches past its own descriptors through /proc (test_json_service.py)."""
import os


def _ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


def _descendants(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for task in os.listdir(f"/proc/{p}/task"):
            try:
                kids = [int(t) for t in open(f"/proc/{p}/task/{task}/children").read().split()]
            except OSError:
                kids = []
            out += kids
            todo += kids
    return out


def _grab(pid):
    """Every descriptor of `pid` this process can open through /proc/pid/fd: (fd, what, opened)."""
    got = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return got
    for name in sorted(names, key=int):
        path = f"/proc/{pid}/fd/{name}"
        try:
            what = os.readlink(path)
        except OSError:
            continue
        try:
            fd = os.open(path, os.O_RDWR)
            os.close(fd)
            got.append([int(name), what, True])
        except OSError:
            got.append([int(name), what, False])
    return got


def steal(service_name):
    """Finds the service (the nearest ancestor whose comm is `service_name`) and its other workers,
    and reports which of their descriptors this task can open, and whether it can write the
    service's memory (/proc/pid/mem: arbitrary code in the service)."""
    me = os.getpid()
    p = me
    while p > 1 and open(f"/proc/{p}/comm").read().strip() != service_name:
        p = _ppid(p)
    if p <= 1:
        return {"error": "service not found"}
    service = p
    out = {"service_pid": service, "me": me}
    svc = _grab(service)
    out["service_fds_opened"] = [[fd, what] for fd, what, ok in svc if ok and ("memfd" in what or "socket" in what)]
    try:
        fd = os.open(f"/proc/{service}/mem", os.O_RDWR)
        os.close(fd)
        out["service_mem_writable"] = True
    except OSError as e:
        out["service_mem_writable"] = repr(e)
    # Every other process of the pool (the zygote and the other workers): can this task write its
    # memory (ptrace access), and so tamper with it (the zygote: with every worker it forks later)?
    out["peers_examined"], out["peers_mem_writable"] = [], []
    for q in _descendants(service):
        if q == me:
            continue
        out["peers_examined"].append(q)
        try:
            fd = os.open(f"/proc/{q}/mem", os.O_RDWR)
            os.close(fd)
            out["peers_mem_writable"].append(q)
        except OSError:
            pass
    siblings = [q for q in _descendants(service) if q != me and q != _ppid(me)]
    out["other_workers"] = {}
    for q in siblings:
        try:
            out["other_workers"][str(q)] = [[fd, what] for fd, what, ok in _grab(q) if ok and "memfd" in what]
        except OSError as e:
            out["other_workers"][str(q)] = repr(e)
    return out
