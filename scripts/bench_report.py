"""Combine the crate's GPU benchmark with PyTorch's into one table and one chart.

usage: python3 scripts/bench_report.py OURS.json PEERS.json [--svg docs/bench.svg]

OURS.json is written by `cargo run --release --features cuda --example bench -- --json OURS.json`,
PEERS.json by the PyTorch peers script (`peers.py --compile --train --json PEERS.json`). Prints a
markdown table (median ms per problem, mode and implementation, and the fused op's speed-up
over the best PyTorch variant and over plain Candle) and, with --svg, draws it as a bar chart.
Only the standard library is used.
"""
import argparse
import json
import sys

# The crate's mode names; the peers script writes f32 as "fp32".
MODES = ["f32", "tf32", "bf16", "f16"]
IMPLS = [("eager", "PyTorch eager"), ("compile", "torch.compile"), ("plain", "plain Candle"),
         ("autograd", "candle-fused, Candle autograd"), ("fused", "candle-fused")]
COLORS = {"eager": "#8c8c8c", "compile": "#5b8db8", "plain": "#e0a040", "autograd": "#9ccc9c", "fused": "#3a9a5b"}


def load(ours_path, peers_path):
    """Median ms by (problem, mode, step) and implementation."""
    cells = {}
    ours = json.load(open(ours_path))
    for row in ours["rows"]:
        key = (row["problem"], row["mode"], row["step"])
        cells.setdefault(key, {})[row["impl"]] = row["median_ms"]
    peers = json.load(open(peers_path))
    for row in peers["rows"]:
        mode = "f32" if row["mode"] == "fp32" else row["mode"]
        if row["variant"] == "train_eager":
            key, impl = (row["problem"], mode, "train"), "eager"
        else:
            key, impl = (row["problem"], mode, "fwd"), row["variant"]
        cells.setdefault(key, {})[impl] = row["ms"]
    order = lambda k: (k[0], k[2], MODES.index(k[1]) if k[1] in MODES else 99)
    return [(k, cells[k]) for k in sorted(cells, key=order)], ours, peers


def markdown(rows):
    lines = ["| problem | step | mode | " + " | ".join(name for _, name in IMPLS) + " | vs best PyTorch | vs plain Candle |",
             "|---|---|---|" + "---:|" * (len(IMPLS) + 2)]
    for (problem, mode, step), times in rows:
        cols = [f"{times[i]:.3f}" if i in times else "" for i, _ in IMPLS]
        torch_best = min((times[i] for i in ("eager", "compile") if i in times), default=None)
        fused = times.get("fused")
        vs_torch = f"{torch_best / fused:.2f}×" if fused and torch_best else ""
        vs_plain = f"{times['plain'] / fused:.2f}×" if fused and "plain" in times else ""
        lines.append(f"| {problem} | {step} | {mode} | " + " | ".join(cols) + f" | {vs_torch} | {vs_plain} |")
    return "\n".join(lines)


def svg(rows, title):
    """Horizontal bars, one group per (problem, step, mode), time relative to PyTorch eager."""
    bar, gap, left, width = 11, 10, 250, 470
    groups = [(k, t) for k, t in rows if "eager" in t]
    height = 60 + sum(len([i for i, _ in IMPLS if i in t]) * bar + gap for _, t in groups) + 40
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{left + width + 90}" height="{height}" font-family="sans-serif" font-size="11">',
           f'<text x="10" y="20" font-size="14" font-weight="bold">{title}</text>',
           '<text x="10" y="38">time relative to PyTorch eager (shorter is faster); label: median ms</text>']
    y = 55
    scale = width / max(max(t.values()) / t["eager"] for _, t in groups)
    for (problem, mode, step), times in groups:
        out.append(f'<text x="10" y="{y + bar}">{problem} {step} {mode}</text>')
        for impl, _ in IMPLS:
            if impl not in times:
                continue
            w = times[impl] / times["eager"] * scale
            out.append(f'<rect x="{left}" y="{y}" width="{w:.1f}" height="{bar - 1}" fill="{COLORS[impl]}"/>')
            out.append(f'<text x="{left + w + 4:.1f}" y="{y + bar - 2}">{times[impl]:.3f}</text>')
            y += bar
        y += gap
    x = 10
    for impl, name in IMPLS:
        out.append(f'<rect x="{x}" y="{y + 8}" width="10" height="10" fill="{COLORS[impl]}"/><text x="{x + 14}" y="{y + 17}">{name}</text>')
        x += 30 + 6 * len(name)
    out.append("</svg>")
    return "\n".join(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ours")
    ap.add_argument("peers")
    ap.add_argument("--svg")
    args = ap.parse_args(argv)
    rows, ours, peers = load(args.ours, args.peers)
    print(f"device: {peers.get('device')} (PyTorch {peers.get('torch')}); crate: {ours.get('device')}, {ours.get('iters')} timed runs a cell")
    print(markdown(rows))
    if args.svg:
        with open(args.svg, "w") as f:
            f.write(svg(rows, f"candle-fused vs PyTorch and plain Candle on {peers.get('device')}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
