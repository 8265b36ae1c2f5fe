#!/usr/bin/env python3
"""Medians per (workload, variant, clients) of run.sh's CSV (stdin), and B/A ratios, as a Markdown table."""
import csv, statistics, sys
from collections import defaultdict

cells = defaultdict(list)
for r in csv.DictReader(sys.stdin):
    cells[(r["workload"], r["variant"], int(r["clients"]))].append(r)
med = lambda rows, k: statistics.median(float(r[k]) for r in rows)
print("| workload | clients | A msgs/s | B msgs/s | B/A | A WAL B/msg | B WAL B/msg | B/A WAL | A id index MB | B id index MB | A all indexes MB | B all indexes MB | A CPU µs/msg | B CPU µs/msg | B/A CPU |")
print("|---" * 15 + "|")
for w in ("send_one", "send_batch", "consume"):
    for c in (1, 2, 4):
        a, b = cells.get((w, "a", c)), cells.get((w, "b", c))
        if not a or not b:
            continue
        ma, mb = med(a, "msgs_per_s"), med(b, "msgs_per_s")
        wa, wb = med(a, "wal_per_msg"), med(b, "wal_per_msg")
        mib = lambda rows, k: med(rows, k) / 2**20
        print(f"| {w} | {c} | {ma:,.0f} | {mb:,.0f} | {mb/ma:.2f} | {wa:.0f} | {wb:.0f} | {wb/wa:.2f} | "
              f"{mib(a,'id_index_bytes'):.1f} | {mib(b,'id_index_bytes'):.1f} | {mib(a,'all_index_bytes'):.1f} | {mib(b,'all_index_bytes'):.1f} | "
              f"{med(a,'server_cpu_us_per_msg'):.1f} | {med(b,'server_cpu_us_per_msg'):.1f} | {med(b,'server_cpu_us_per_msg')/med(a,'server_cpu_us_per_msg'):.2f} |")
