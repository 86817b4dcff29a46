"""Time to read all 70,000 Fashion-MNIST images and labels from the Debian package's IDX files.

Usage: python benchmarks/data_load.py [--data-dir /usr/share/datasets/fashion-mnist] [--out ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _results import write_result

from logitpair.data import DATASETS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--out", default="benchmarks/results/data_load.json")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    times = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        train, test, source = DATASETS.get("fashion-mnist")(Path(args.data_dir) if args.data_dir else None)
        times.append(time.perf_counter() - t)
    result = {
        "images": len(train) + len(test),
        "source": source,
        "seconds_min": min(times),
        "seconds_all": times,
    }
    write_result(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
