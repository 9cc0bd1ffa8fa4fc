"""Where a GPU step's time goes, from CubeCL's profiling log.

    python benches/profile_summary.py profile.log [--top 25]

CubeCL writes one line per kernel it runs when its profiling logger is on (a `cubecl.toml` in
the working directory with `[profiling.logger] level = "basic"` and `file = "..."`; `benches/gpu.sh`
with PROFILE=1 writes one), e.g. `| 1.391596ms | PrngKernel | NormalFamily | CudaRuntime`. The
profiler waits for each kernel, so the times are each kernel's own, not a step's wall time. This
prints, per kernel name, the launches, the total time and its share, largest first, as JSON lines.
"""

import argparse
import json
import re
from collections import defaultdict

UNITS = {"ns": 1e-9, "µs": 1e-6, "us": 1e-6, "ms": 1e-3, "s": 1.0}
LINE = re.compile(r"^\|\s*([0-9.]+)(ns|µs|us|ms|s)\s*\|\s*(.+?)\s*$")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log")
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    seconds, launches = defaultdict(float), defaultdict(int)
    with open(args.log, encoding="utf-8", errors="replace") as f:
        for line in f:
            m = LINE.match(line.strip())
            if not m:
                continue
            value, unit, name = m.groups()
            # The runtime's name (the last field) is the same on every line.
            name = " | ".join(name.split(" | ")[:-1]) or name
            seconds[name] += float(value) * UNITS[unit]
            launches[name] += 1
    total = sum(seconds.values())
    if not total:
        raise SystemExit(f"{args.log}: no profiled kernels (is the profiling logger on?)")
    print(json.dumps({"kernels": sum(launches.values()), "total_ms": round(total * 1e3, 3)}))
    for name, s in sorted(seconds.items(), key=lambda kv: -kv[1])[: args.top]:
        print(json.dumps({
            "kernel": name,
            "launches": launches[name],
            "total_ms": round(s * 1e3, 3),
            "share": round(s / total, 4),
        }, ensure_ascii=False))


if __name__ == "__main__":
    main()
