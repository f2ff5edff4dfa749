#!/usr/bin/env python3
"""Where a decode step's time goes inside its CUDA graph: each kernel's start, length and the gap before it.

    nsys profile --cuda-graph-trace=node --trace=cuda -o T node dist/src/cli/main.js bench ... --batch 1
    nsys stats --report cuda_gpu_trace --format csv --output T T.nsys-rep
    python3 tools/timeline.py T_cuda_gpu_trace.csv [--skip 20]

The trace lists every kernel the GPU ran, graph nodes included. A decode step ends with the kernel that
feeds the sampled tokens back (advance_kernel), so the kernels between two of them are one step. For each
position in the step (the same kernels in the same order every step), the table gives the median over the
steps of: the start after the step's first kernel started, the duration, and the gap from the end of the
kernel before (negative where programmatic dependent launch let it start early). Kernels of other shapes
(prefill, warm-up) are left out, as are the first `--skip` steps.
"""
import argparse
import csv
import statistics
import sys


def column(header, prefix):
    for i, name in enumerate(header):
        if name.startswith(prefix):
            return i
    sys.exit(f"timeline: no column starting with {prefix!r} in {header}")


def kernels(path):
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = next(rows)
        start, duration, name = column(header, "Start"), column(header, "Duration"), column(header, "Name")
        for r in rows:
            if len(r) > name and r[duration] and "memcpy" not in r[name].lower() and "memset" not in r[name].lower():
                yield int(float(r[start])), int(float(r[duration])), r[name]


def short(name):
    """A kernel's name without its template arguments and parameter list."""
    base = name.split("<")[0].split("(")[0].strip()
    return base.rsplit(" ", 1)[-1].rsplit("::", 1)[-1]


def steps(trace, last="advance_kernel"):
    step = []
    for k in trace:
        step.append(k)
        if short(k[2]) == last:
            yield step
            step = []


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("csv")
    ap.add_argument("--skip", type=int, default=20, help="steps to leave out at the start (warm-up, first calls)")
    args = ap.parse_args()
    all_steps = list(steps(sorted(kernels(args.csv))))
    if not all_steps:
        sys.exit("timeline: no step ends with advance_kernel in this trace (was it run with --cuda-graph-trace=node?)")
    # The decode steps are the most common sequence of kernel names.
    shapes = {}
    for s in all_steps[args.skip:]:
        shapes.setdefault(tuple(short(k[2]) for k in s), []).append(s)
    names, chosen = max(shapes.items(), key=lambda kv: len(kv[1]))
    print(f"{len(chosen)} steps of {len(names)} kernels (of {len(all_steps)} steps in the trace)")
    ends = [s[-1][0] + s[-1][1] - s[0][0] for s in chosen]
    print(f"step, first kernel's start to last kernel's end: median {statistics.median(ends) / 1e3:.1f} us")
    between = [b[0][0] - (a[-1][0] + a[-1][1]) for a, b in zip(chosen, chosen[1:])]
    if between:
        q = statistics.quantiles(between, n=20) if len(between) > 1 else between * 19
        print(f"between steps (last kernel's end to the next one's first start): median {statistics.median(between) / 1e3:.1f} us, "
              f"p95 {q[-1] / 1e3:.1f} us (the host's turn between calls), max {max(between) / 1e3:.1f} us")
    print(f"{'#':>3} {'kernel':<34} {'start us':>9} {'dur us':>8} {'gap us':>8}")
    totals = {}
    for i, name in enumerate(names):
        start = statistics.median(s[i][0] - s[0][0] for s in chosen)
        dur = statistics.median(s[i][1] for s in chosen)
        gap = statistics.median(s[i][0] - (s[i - 1][0] + s[i - 1][1]) for s in chosen) if i else 0
        totals.setdefault(name, [0, 0, 0])
        totals[name][0] += 1
        totals[name][1] += dur
        totals[name][2] += gap
        print(f"{i:>3} {name[:34]:<34} {start / 1e3:>9.2f} {dur / 1e3:>8.2f} {gap / 1e3:>8.2f}")
    print(f"\n{'kernel':<34} {'per step':>8} {'dur us':>9} {'gaps us':>9}")
    for name, (count, dur, gap) in sorted(totals.items(), key=lambda kv: -kv[1][1]):
        print(f"{name[:34]:<34} {count:>8} {dur / 1e3:>9.1f} {gap / 1e3:>9.1f}")


if __name__ == "__main__":
    main()
