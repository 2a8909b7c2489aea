#!/usr/bin/env python3
"""Plot or tabulate the fetch matrix written by ``benches/matrix.sh``.

    python benches/plot.py target/bench/matrix.json --out target/bench/fetch-gbps.svg
    python benches/plot.py target/bench/matrix.json --table > target/bench/tables.md

The plot: payload GB/s against value size for one batch and concurrency, one line per path
that appears in the results (kvshelf's paths, redis-py, and the ceilings measured in the
same run as dashed lines). The tables: one per (size, batch, concurrency) cell, every
path's GB/s, its ratio to redis-benchmark GET and to the loopback TCP stream, and its
latency percentiles.

Several files may be given (say, runs of different cells); later files win where they
measured the same path in the same cell.
"""

import argparse
import json
import sys

SIZE_TICKS = [(196608, "192 KiB"), (2097152, "2 MiB"), (33554432, "32 MiB")]
REFERENCE = "redis-benchmark GET"
LOOPBACK = "loopback TCP"
# Display names for paths whose JSON name is terse; anything else shows as it is.
LABELS = {"redis-py-get": "redis-py GET", "redis-py-set": "redis-py SET"}


def size_label(n):
    for v, label in SIZE_TICKS:
        if v == n:
            return label
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return f"{n >> shift} {unit}"
    return f"{n} B"


def load(files):
    """Cells keyed by (value_bytes, batch, concurrency), with paths and ceilings by name."""
    machines, started, skipped, cells = [], [], [], {}
    for f in files:
        with open(f) as fh:
            doc = json.load(fh)
        if doc.get("machine") and doc["machine"] not in machines:
            machines.append(doc["machine"])
        if doc.get("started"):
            started.append(doc["started"])
        skipped.extend(doc.get("skipped", []))
        # Failed cells are listed with the skipped ones, their reason says which.
        skipped.extend(doc.get("failed", []))
        for c in doc.get("cells", []):
            k = (c["value_bytes"], c["batch"], c["concurrency"])
            cell = cells.setdefault(
                k, {"paths": {}, "ceilings": {}, "requests": None, "redis_py": None}
            )
            cell["requests"] = c.get("requests", cell["requests"])
            cell["redis_py"] = c.get("redis_py") or cell["redis_py"]
            for p in c.get("paths", []):
                cell["paths"][p["path"]] = p
            for ceiling in c.get("ceilings", []):
                cell["ceilings"][ceiling["name"]] = ceiling
    return machines, started, skipped, cells


def fmt_ms(v):
    if v is None:
        return "–"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def fmt_ratio(v, ref):
    return f"{v / ref:.2f}" if ref else "–"


def tables(machines, started, skipped, cells, batch, concurrency):
    out = ["# Fetch matrix", ""]
    for m in machines:
        out.append(f"Machine: {m}  ")
    if started:
        out.append(f"Started: {', '.join(started)}  ")
    clients = {json.dumps(c["redis_py"], sort_keys=True) for c in cells.values() if c["redis_py"]}
    for c in sorted(clients):
        info = json.loads(c)
        out.append(
            f"redis-py: {info.get('redis_py')} ({info.get('parser')} parser, "
            f"RESP{info.get('protocol')})  "
        )
    out += [
        "",
        "GB/s is payload bytes (10^9) per second of wall time. Latency is per request "
        "(one request = a batch of blocks); redis-benchmark's is per command within a "
        "pipeline of `batch` (`-P batch -c concurrency`). Ceiling rows are in italics.",
    ]
    for (size, b, c), cell in sorted(cells.items()):
        if (batch is not None and b != batch) or (concurrency is not None and c != concurrency):
            continue
        ref = cell["ceilings"].get(REFERENCE, {}).get("gbps")
        loop = cell["ceilings"].get(LOOPBACK, {}).get("gbps")
        reqs = f", {cell['requests']} requests per path" if cell["requests"] else ""
        out += [
            "",
            f"## {size_label(size)}, batch {b}, concurrency {c}{reqs}",
            "",
            f"| path | GB/s | × {REFERENCE} | × {LOOPBACK} | p50 ms | p99 ms | p99.9 ms |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, p in cell["paths"].items():
            out.append(
                f"| {LABELS.get(name, name)} | {p['gbps']:.3f} | {fmt_ratio(p['gbps'], ref)} "
                f"| {fmt_ratio(p['gbps'], loop)} | {fmt_ms(p.get('p50_ms'))} "
                f"| {fmt_ms(p.get('p99_ms'))} | {fmt_ms(p.get('p999_ms'))} |"
            )
        for name, p in cell["ceilings"].items():
            out.append(
                f"| *{name}* | *{p['gbps']:.3f}* | {fmt_ratio(p['gbps'], ref)} "
                f"| {fmt_ratio(p['gbps'], loop)} | {fmt_ms(p.get('p50_ms'))} "
                f"| {fmt_ms(p.get('p99_ms'))} | {fmt_ms(p.get('p999_ms'))} |"
            )
    if skipped:
        out += ["", "## Skipped or failed", ""]
        for s in skipped:
            out.append(
                f"- {size_label(s['value_bytes'])}, batch {s['batch']}, concurrency "
                f"{s['concurrency']}: {s.get('reason', 'skipped')}"
            )
    return "\n".join(out) + "\n"


def plot(machines, cells, batch, concurrency, out, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = {k[0]: v for k, v in cells.items() if k[1] == batch and k[2] == concurrency}
    if not chosen:
        have = sorted({(k[1], k[2]) for k in cells})
        sys.exit(
            f"plot.py: no cell with batch {batch} and concurrency {concurrency}; "
            f"the results have (batch, concurrency) {have}"
        )
    # Lines in order of first appearance: paths, then ceilings.
    paths, ceilings = {}, {}
    for size in sorted(chosen):
        for name, p in chosen[size]["paths"].items():
            paths.setdefault(name, {})[size] = p["gbps"]
        for name, p in chosen[size]["ceilings"].items():
            ceilings.setdefault(name, {})[size] = p["gbps"]

    fig, ax = plt.subplots(figsize=(9, 5.5))
    colors = plt.get_cmap("tab10" if len(paths) <= 10 else "tab20").colors
    for i, (name, pts) in enumerate(paths.items()):
        xs = sorted(pts)
        ax.plot(
            xs, [pts[x] for x in xs], marker="o", color=colors[i % len(colors)],
            label=LABELS.get(name, name),
        )
    grays = ["black", "dimgray", "darkgray", "silver"]
    for i, (name, pts) in enumerate(ceilings.items()):
        xs = sorted(pts)
        ax.plot(
            xs, [pts[x] for x in xs], linestyle="--", marker="s", markersize=4,
            color=grays[i % len(grays)], label=name,
        )
    ax.set_xscale("log")
    ax.set_xticks([v for v, _ in SIZE_TICKS], [label for _, label in SIZE_TICKS])
    ax.minorticks_off()
    ax.set_xlim(SIZE_TICKS[0][0] / 1.6, SIZE_TICKS[-1][0] * 1.6)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("value size (one block)")
    ax.set_ylabel("payload GB/s (10⁹ bytes/s)")
    ax.grid(True, alpha=0.3)
    ax.set_title(
        f"Fetch throughput, batch {batch}, concurrency {concurrency}\n" + "; ".join(machines),
        fontsize=10,
    )
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=9)
    fig.tight_layout()
    fig.savefig(out)
    written = [out]
    if png:
        png_out = out.rsplit(".", 1)[0] + ".png"
        fig.savefig(png_out, dpi=150)
        written.append(png_out)
    print(f"plot.py: wrote {', '.join(written)}", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("files", nargs="+", help="matrix.json files from benches/matrix.sh")
    ap.add_argument("--batch", type=int, help="blocks per request (plot default: 8)")
    ap.add_argument("--concurrency", type=int, help="concurrent clients (plot default: 4)")
    ap.add_argument("--out", default="benches/fetch-gbps.svg", help="SVG to write")
    ap.add_argument("--png", action="store_true", help="also write a PNG beside the SVG")
    ap.add_argument(
        "--table", action="store_true",
        help="print markdown tables instead (every cell, unless --batch/--concurrency)",
    )
    args = ap.parse_args()
    machines, started, skipped, cells = load(args.files)
    if args.table:
        sys.stdout.write(
            tables(machines, started, skipped, cells, args.batch, args.concurrency)
        )
    else:
        batch = 8 if args.batch is None else args.batch
        concurrency = 4 if args.concurrency is None else args.concurrency
        plot(machines, cells, batch, concurrency, args.out, args.png)


if __name__ == "__main__":
    main()
