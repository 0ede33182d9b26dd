#!/usr/bin/env python3
"""Medians and ratios of a bench/compare.sh raw file, as a Markdown table.

Usage: bench/compare_report.py RAW...   (several raw files of the same dataset are pooled)
"""
import statistics
import sys
from collections import defaultdict

STEPS = ["full", "incr-local", "incr-tpcb", "restore", "delta-same", "delta-stale"]


def main(paths):
    rows = defaultdict(list)
    header = []
    requests = defaultdict(list)
    for p in paths:
        for line in open(p):
            if line.startswith("# requests "):
                # "# requests REPEAT STEP TOOL GET=n PUT=n ... TOTAL"
                f = line.split()
                by_method = dict(kv.split("=") for kv in f[5:-1])
                requests[(f[3], f[4])].append((int(f[-1]), by_method))
                continue
            if line.startswith("#"):
                header.append(line.strip())
                continue
            f = line.split()
            if len(f) != 7:
                continue
            _, step, tool, wall, cpu, rss, added = f
            rows[(step, tool)].append((float(wall), float(cpu), int(rss), int(added)))
    for h in header[:2]:
        print(h.lstrip("# ").join(["`", "`"]) + "  ")
    print()
    tools = sorted(
        {t for (_, t) in rows},
        key=lambda t: (t != "pgbackrest", t != "pg_basebackup", t == "floor", t),
    )
    med = {}
    for k, v in rows.items():
        med[k] = tuple(statistics.median(x[i] for x in v) for i in range(4)) + (len(v),)
    print("| step | tool | n | wall s | vs pgBackRest | vs pg_basebackup | CPU s | peak MiB | repo added MiB | vs pgBackRest |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for s in STEPS:
        base = med.get((s, "pgbackrest"))
        bb = med.get((s, "pg_basebackup"))
        for t in tools:
            m = med.get((s, t))
            if not m:
                continue
            wall, cpu, rss, added, n = m
            r_wall = f"{wall / base[0]:.2f}x" if base and base[0] > 0 else "-"
            r_bb = f"{wall / bb[0]:.2f}x" if bb and bb[0] > 0 and t != "pg_basebackup" else "-"
            has_size = s in ("full", "incr-local", "incr-tpcb")
            size = f"{added / 1048576:.1f}" if has_size else "-"
            r_size = (
                f"{added / base[3]:.2f}x"
                if has_size and base and base[3] > 0 and t != "pgbackrest"
                else "-"
            )
            print(
                f"| {s} | {t} | {n} | {wall:.2f} | {r_wall if t != 'pgbackrest' else '1'} | {r_bb} | "
                f"{cpu:.2f} | {rss / 1024:.0f} | {size} | {r_size} |"
            )
    if requests:
        print()
        print(
            "Storage requests per backup (pgkeep: its run record, counted on the wire; "
            "pgBackRest: SeaweedFS's count for its bucket; medians):"
        )
        print()
        print("| step | tool | n | requests | by method |")
        print("|---|---|---|---|---|")
        for st in STEPS:
            for t in tools:
                v = requests.get((st, t))
                if not v:
                    continue
                total = statistics.median(x[0] for x in v)
                last = v[-1][1]
                methods = ", ".join(f"{k} {n}" for k, n in sorted(last.items()))
                print(f"| {st} | {t} | {len(v)} | {total:.0f} | {methods} |")


if __name__ == "__main__":
    main(sys.argv[1:])
