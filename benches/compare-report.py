#!/usr/bin/env python3
"""Turns the JSON reports of benches/compare-etcd.sh into a markdown report with a
side-by-side table and two SVG charts (latency percentiles, throughput vs concurrency).
Standard library only.   usage: compare-report.py OUT_DIR REGIONS > OUT_DIR/report.md"""
import glob
import json
import math
import os
import platform
import sys

out, regions = sys.argv[1], sys.argv[2]
# (target, workload, concurrency) -> every run of it (one per round), each with the server
# CPU seconds of its measured part when recorded (OUT_DIR/<run>.cpu).
runs = {}
for path in sorted(glob.glob(os.path.join(out, "*.json"))):
    with open(path) as f:
        r = json.load(f)
    cpu = path[: -len(".json")] + ".cpu"
    if os.path.exists(cpu):
        with open(cpu) as f:
            r["cpu_seconds"] = json.load(f)["cpu_seconds"]
        if r["ops"] > 0:
            r["cpu_us_per_op"] = 1e6 * r["cpu_seconds"] / r["ops"]
    runs.setdefault((r["target"], r["workload"], r["concurrency"]), []).append(r)
rounds = max((len(v) for v in runs.values()), default=0)


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return None if n == 0 else (xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2)

COLORS = {("tessera", "put"): "#1f77b4", ("tessera", "get"): "#17becf",
          ("etcd", "put"): "#d62728", ("etcd", "get"): "#ff7f0e"}


def svg_chart(path, title, xlabels, series, ylabel, ylog):
    """series: list of (name, color, [y or None per x])."""
    w, h, left, right, top, bottom = 720, 400, 70, 170, 40, 50
    ys = [y for _, _, vals in series for y in vals if y]
    if not ys:
        return
    lo, hi = min(ys), max(ys)
    if ylog:
        lo, hi = 10 ** math.floor(math.log10(lo)), 10 ** math.ceil(math.log10(hi))
        fy = lambda y: (math.log10(y) - math.log10(lo)) / (math.log10(hi) - math.log10(lo))
        ticks = [10 ** e for e in range(int(math.log10(lo)), int(math.log10(hi)) + 1)]
    else:
        lo, hi = 0, hi * 1.1
        fy = lambda y: y / hi
        ticks = [hi * i / 5 for i in range(6)]
    pw, ph = w - left - right, h - top - bottom
    X = lambda i: left + pw * (i / max(1, len(xlabels) - 1))
    Y = lambda y: top + ph * (1 - fy(y))
    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">',
         f'<rect width="{w}" height="{h}" fill="white"/>',
         f'<text x="{w/2}" y="22" text-anchor="middle" font-size="15">{title}</text>',
         f'<line x1="{left}" y1="{top+ph}" x2="{left+pw}" y2="{top+ph}" stroke="black"/>',
         f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top+ph}" stroke="black"/>',
         f'<text x="16" y="{top+ph/2}" transform="rotate(-90 16 {top+ph/2})" text-anchor="middle">{ylabel}</text>']
    for t in ticks:
        s.append(f'<line x1="{left}" y1="{Y(t):.1f}" x2="{left+pw}" y2="{Y(t):.1f}" stroke="#ddd"/>')
        label = f"{t:g}" if t < 1e4 else f"{t/1000:g}k"
        s.append(f'<text x="{left-6}" y="{Y(t)+4:.1f}" text-anchor="end">{label}</text>')
    for i, xl in enumerate(xlabels):
        s.append(f'<text x="{X(i):.1f}" y="{top+ph+18}" text-anchor="middle">{xl}</text>')
    for n, (name, color, vals) in enumerate(series):
        pts = [(X(i), Y(v)) for i, v in enumerate(vals) if v]
        if pts:
            s.append('<polyline fill="none" stroke-width="2" stroke="%s" points="%s"/>'
                     % (color, " ".join(f"{x:.1f},{y:.1f}" for x, y in pts)))
            for x, y in pts:
                s.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
        ly = top + 10 + 18 * n
        s.append(f'<line x1="{left+pw+15}" y1="{ly}" x2="{left+pw+35}" y2="{ly}" stroke="{color}" stroke-width="3"/>')
        s.append(f'<text x="{left+pw+40}" y="{ly+4}">{name}</text>')
    s.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(s))


def g(t, w, c, k):
    """The median over the rounds of one figure of one run."""
    return median([r[k] for r in runs.get((t, w, c), []) if k in r])


def spread(t, w, c):
    v = [r["ops_per_sec"] for r in runs.get((t, w, c), [])]
    return f" ({min(v):,.0f}–{max(v):,.0f})" if len(v) > 1 else ""


def fmt(v, unit=""):
    if v is None:
        return "–"
    return f"{v:,.0f}{unit}" if v >= 100 else f"{v:.2f}{unit}"


def ratio(a, b):
    return f"{a / b:.2f}×" if a and b else "–"


print("# tessera vs etcd, same machine, same run\n")
print(f"- machine: {os.cpu_count()} cores, {platform.platform()}")
print(f"- tessera: 3 nodes, {regions} user regions + placement, 3 replicas, fsync on "
      "(`storage.sync_writes = true`), 1 raft worker per node")
extra = os.environ.get("TESSERA_ARGS", "").strip()
if "--unary" in extra.split():
    print(f"- tessera runs with `{extra}`: one unary gRPC call per request, as on etcd's side")
else:
    print("- tessera's client multiplexes the requests to a node on one stream (`Kv.Commands`); "
          "etcd's side makes one unary gRPC call per request, as etcd's own clients do"
          + (f"; tessera runs with `{extra}`" if extra else ""))
print("- etcd: 3 members (Debian etcd-server), fsync on (always), defaults otherwise")
print("- load: `tessera bench` for both, same process and settings: 4 connections, 256-byte "
      "values, uniform keys; the system not under test is paused (SIGSTOP) during each run")
print(f"- workloads at 64 in flight and the single-client put: {rounds} round(s), the systems "
      "taking turns; figures are medians over the rounds, ops/s with (lowest–highest); the rest "
      "of the concurrency sweep runs once")
print("- server CPU per operation: user + system time of the three server processes during the "
      "measured part of a run, divided by its operations (the load generator not included)\n")
print("## Workloads at 64 in flight\n")
print("| workload | etcd ops/s | tessera ops/s | tessera/etcd | etcd p50 / p99 ms | tessera p50 / p99 ms | server CPU µs/op (etcd / tessera) | errors (etcd / tessera) |")
print("|---|---|---|---|---|---|---|---|")
for w in ["put", "get", "mixed", "scan", "cas", "metadata"]:
    e, t = runs.get(("etcd", w, 64)), runs.get(("tessera", w, 64))
    if not e and not t:
        continue
    errs = lambda rs: sum(sum(r["errors"].values()) for r in rs) if rs else "–"
    print(f"| {w} | {fmt(g('etcd', w, 64, 'ops_per_sec'))}{spread('etcd', w, 64)} "
          f"| {fmt(g('tessera', w, 64, 'ops_per_sec'))}{spread('tessera', w, 64)} "
          f"| {ratio(g('tessera', w, 64, 'ops_per_sec'), g('etcd', w, 64, 'ops_per_sec'))} "
          f"| {fmt(g('etcd', w, 64, 'p50_ms'))} / {fmt(g('etcd', w, 64, 'p99_ms'))} "
          f"| {fmt(g('tessera', w, 64, 'p50_ms'))} / {fmt(g('tessera', w, 64, 'p99_ms'))} "
          f"| {fmt(g('etcd', w, 64, 'cpu_us_per_op'))} / {fmt(g('tessera', w, 64, 'cpu_us_per_op'))} "
          f"| {errs(e)} / {errs(t)} |")

conc = sorted({c for (_, w, c) in runs if w in ("put", "get")})
print("\n## Throughput versus concurrency\n")
print("| in flight | etcd put | tessera put | ratio | etcd get | tessera get | ratio |")
print("|---|---|---|---|---|---|---|")
for c in conc:
    print(f"| {c} | {fmt(g('etcd', 'put', c, 'ops_per_sec'))} | {fmt(g('tessera', 'put', c, 'ops_per_sec'))} "
          f"| {ratio(g('tessera', 'put', c, 'ops_per_sec'), g('etcd', 'put', c, 'ops_per_sec'))} "
          f"| {fmt(g('etcd', 'get', c, 'ops_per_sec'))} | {fmt(g('tessera', 'get', c, 'ops_per_sec'))} "
          f"| {ratio(g('tessera', 'get', c, 'ops_per_sec'), g('etcd', 'get', c, 'ops_per_sec'))} |")

print("\n## Goals\n")
goals = [
    ("write throughput at 64 in flight ≥ 3× etcd", g("tessera", "put", 64, "ops_per_sec"),
     g("etcd", "put", 64, "ops_per_sec"), lambda t, e: t >= 3 * e, "ops/s"),
    ("single-client write p50 ≤ etcd's", g("tessera", "put", 1, "p50_ms"),
     g("etcd", "put", 1, "p50_ms"), lambda t, e: t <= e, "ms"),
    ("linearizable read throughput at 64 in flight ≥ 2× etcd", g("tessera", "get", 64, "ops_per_sec"),
     g("etcd", "get", 64, "ops_per_sec"), lambda t, e: t >= 2 * e, "ops/s"),
]
print("| goal | tessera | etcd | ratio | met |")
print("|---|---|---|---|---|")
for name, t, e, ok, unit in goals:
    met = "yes" if t and e and ok(t, e) else ("no" if t and e else "not measured")
    print(f"| {name} | {fmt(t)} {unit} | {fmt(e)} {unit} | {ratio(t, e)} | {met} |")

pcts = ["p50", "p75", "p90", "p95", "p99", "p99.5", "p99.9", "p99.99", "max"]
series = []
for t in ("etcd", "tessera"):
    for w in ("put", "get"):
        rs = runs.get((t, w, 64))
        if rs:
            per_pct = zip(*[[v for _, v in r["percentiles_ms"]] for r in rs])
            series.append((f"{t} {w}", COLORS[(t, w)], [max(median(list(v)), 0.001) for v in per_pct]))
svg_chart(os.path.join(out, "latency.svg"), "Latency at 64 in flight", pcts, series, "ms (log)", True)
series = []
for t in ("etcd", "tessera"):
    for w in ("put", "get"):
        series.append((f"{t} {w}", COLORS[(t, w)], [g(t, w, c, "ops_per_sec") for c in conc]))
svg_chart(os.path.join(out, "throughput.svg"), "Throughput vs operations in flight",
          [str(c) for c in conc], series, "ops/s (log)", True)
print("\n![latency percentiles](latency.svg)\n\n![throughput vs concurrency](throughput.svg)")
print("\nRaw per-run JSON (`tessera bench --json`) and text output (`runs.txt`) are next to this file.")
