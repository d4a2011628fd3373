"""PNG charts from the benchmark suite's JSON results (matplotlib, Debian's python3-matplotlib).

    /usr/bin/python3 benchmarks/charts.py RESULTS_DIR [--out DIR]

Reads what the suite wrote into RESULTS_DIR (each file optional; a quick run's ``-quick`` file is
used when there is no full one) and writes one chart per audience into DIR (default: RESULTS_DIR):

- ``queues.png``   from bench_transport[-quick].json: array throughput (GB/s) by message size,
                   ringpool.Queue against multiprocessing.Queue;
- ``dataloader.png`` from bench_spawner[-quick].json: DataLoader samples/s per dataset and worker
                   count, one bar per start method;
- ``pools.png``    from bench_pool[-quick].json: no-op tasks/s by pool, chunksize 1 and 64.

Each chart's title names the machine and the run's date from the JSON, so a picture always says
where its numbers come from. Exit status 1 if no result file was found.
"""
import argparse
import json
import sys
from pathlib import Path


def _load(results, name):
    for stem in (name, name + "-quick"):
        path = results / f"{stem}.json"
        if path.exists():
            return json.loads(path.read_text()), path.name
    return None, None


def _machine_line(res, source):
    m = res.get("machine", {})
    return (f"{source}, {m.get('date', '?')}: {m.get('cpu', '?')}, {m.get('usable_cores', '?')} cores, "
            f"Linux {m.get('kernel', '?')}, Python {m.get('python', '?')}, load {m.get('loadavg_at_start', ['?'])[0]}")


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def chart_queues(res, source, path):
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    for family, style, color in (("ringpool", "o-", "tab:blue"), ("stdlib", "s--", "tab:orange")):
        rows = sorted((r for r in res["arrays"] if r["family"] == family and r["transport"].endswith("Queue")),
                      key=lambda r: r["size_mib"])
        if rows:
            ax.plot([r["size_mib"] for r in rows], [r["median"] for r in rows], style, color=color,
                    label=rows[0]["transport"].replace("mp.", "multiprocessing."))
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("numpy array size (MiB)")
    ax.set_ylabel("GB/s, 1 producer -> 1 consumer (log)")
    ax.set_title("Queue throughput by message size", fontsize=11)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.text(0.5, 0.01, _machine_line(res, source), ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chart_dataloader(res, source, path):
    plt = _plt()
    rows = res["dataloader"]
    methods = [m for m in ("fork", "spawn", "forkserver", "ringpool", "ringpool-auto")
               if any(r["method"] == m for r in rows)]
    groups = []
    for r in rows:
        key = (r["dataset"], r["workers"])
        if key not in groups:
            groups.append(key)
    fig, ax = plt.subplots(figsize=(9, 4.6))
    width = 0.8 / len(methods)
    colors = {"fork": "tab:gray", "spawn": "tab:red", "forkserver": "tab:orange", "ringpool": "tab:blue",
              "ringpool-auto": "tab:cyan"}
    for i, m in enumerate(methods):
        vals = []
        for g in groups:
            hit = [r for r in rows if (r["dataset"], r["workers"]) == g and r["method"] == m]
            vals.append(hit[0]["samples_per_s"] if hit else 0)
        ax.bar([j + i * width for j in range(len(groups))], vals, width, label=m, color=colors.get(m))
    ax.set_xticks([j + width * (len(methods) - 1) / 2 for j in range(len(groups))],
                  [f"{d}\n{w} workers" for d, w in groups])
    ax.set_yscale("log")
    ax.set_ylabel("samples/s, whole epochs (log)")
    ax.set_title("DataLoader throughput by start method", fontsize=11)
    ax.legend(fontsize=8)
    fig.text(0.5, 0.01, _machine_line(res, source), ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def chart_pools(res, source, path):
    plt = _plt()
    rows = list(res["pools"])
    names = [r["pool"] for r in rows]
    c1 = [r["chunksize_1"]["tasks_per_s"] for r in rows]
    c64 = [r["chunksize_64"]["tasks_per_s"] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.6))
    xs = range(len(names))
    b1 = ax.bar([x - 0.2 for x in xs], c1, 0.4, label="map, chunksize 1", color="tab:blue")
    b2 = ax.bar([x + 0.2 for x in xs], c64, 0.4, label="map, chunksize 64", color="tab:gray")
    ax.bar_label(b1, [f"{v / 1e3:,.0f}k" for v in c1], fontsize=7)
    ax.bar_label(b2, [f"{v / 1e3:,.0f}k" for v in c64], fontsize=7)
    ax.set_xticks(list(xs), [n.replace("concurrent.futures.", "").replace(" ", "\n", 1) for n in names], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("no-op tasks/s, 2 workers (log)")
    ax.set_title("Task pools", fontsize=11)
    ax.legend(fontsize=8)
    fig.text(0.5, 0.01, _machine_line(res, source), ha="center", fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path, help="the folder with bench_*.json")
    ap.add_argument("--out", type=Path, help="where to write the PNGs (default: the results folder)")
    args = ap.parse_args(argv)
    out = args.out or args.results
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, key, draw, png in (("bench_transport", "arrays", chart_queues, "queues.png"),
                                 ("bench_spawner", "dataloader", chart_dataloader, "dataloader.png"),
                                 ("bench_pool", "pools", chart_pools, "pools.png")):
        res, source = _load(args.results, name)
        if res is None or not res.get(key):
            continue
        draw(res, source, out / png)
        written.append(str(out / png))
    if not written:
        print(f"no benchmark results in {args.results}", file=sys.stderr)
        return 1
    print("\n".join(written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
