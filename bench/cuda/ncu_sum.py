"""GPU time by kernel from Nsight Compute's CSV (``ncu --csv --metrics gpu__time_duration.sum``),
per decode step: ``python bench/cuda/ncu_sum.py ncu.csv STEPS`` prints the kernels by total
time, with how many launches a step makes, and the sum (what the GPU itself spends on a step)."""

from __future__ import annotations

import csv
import sys
from collections import defaultdict


def summarize(path: str, steps: int) -> str:
    with open(path, newline="") as f:
        rows = [line for line in f if line.startswith('"')]
    total: dict[str, float] = defaultdict(float)
    count: dict[str, int] = defaultdict(int)
    for row in csv.DictReader(rows):
        if row.get("Metric Name") != "gpu__time_duration.sum":
            continue
        name = row["Kernel Name"][:90]
        value = float(row["Metric Value"].replace(",", ""))
        unit = row.get("Metric Unit", "ns")
        total[name] += value * {"ns": 1e-3, "us": 1.0, "usecond": 1.0, "nsecond": 1e-3, "ms": 1e3}.get(unit, 1e-3)
        count[name] += 1
    lines = [f"{'us/step':>9} {'n/step':>7}  kernel"]
    for name in sorted(total, key=total.get, reverse=True)[:25]:  # type: ignore[arg-type]
        lines.append(f"{total[name] / steps:9.2f} {count[name] / steps:7.2f}  {name}")
    lines.append(
        f"{sum(total.values()) / steps:9.2f} {sum(count.values()) / steps:7.2f}  all kernels ({len(total)} kinds)"
    )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1], int(sys.argv[2])))
