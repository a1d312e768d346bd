"""Reports of serving-benchmark JSON lines: PNG plots (matplotlib, the `bench` extra; per workload,
one figure with latency vs rate (TTFT p50/p90, ITL p50/p90) and goodput vs rate, one line per
configuration, mode x routing) and Markdown tables (one per workload).

    python benchmarks/serve_report.py results.jsonl --out-dir benchmarks/results --prefix cpu --markdown
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

_STYLE = {("disaggregated", "kv_aware"): ("tab:blue", "-"), ("disaggregated", "round_robin"): ("tab:blue", ":"),
          ("colocated", "kv_aware"): ("tab:orange", "-"), ("colocated", "round_robin"): ("tab:orange", ":"),
          ("disaggregated", "cache_aware"): ("tab:blue", "--"), ("colocated", "cache_aware"): ("tab:orange", "--")}


def plot(rows: list[dict], out_dir: Path, prefix: str) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise SystemExit(f"plots need matplotlib: pip install -e '.[bench]' ({e})") from e
    out_dir.mkdir(parents=True, exist_ok=True)
    by_workload: dict[str, list[dict]] = collections.defaultdict(list)
    for row in rows:
        by_workload[row["workload"]].append(row)
    paths = []
    for workload, wrows in sorted(by_workload.items()):
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=72)
        configs = sorted({(r["mode"], r["routing"]) for r in wrows})
        for config in configs:
            pts = sorted((r for r in wrows if (r["mode"], r["routing"]) == config), key=lambda r: r["rate"])
            color, style = _STYLE.get(config, ("tab:gray", "-"))
            label = f"{config[0]} / {config[1]}"
            rates = [r["rate"] for r in pts]
            for ax, key in ((axes[0], "ttft"), (axes[1], "itl")):
                ax.plot(rates, [_ms(r[f"{key}_p50_s"]) for r in pts], color=color, linestyle=style, marker="o",
                        label=f"{label} p50")
                ax.plot(rates, [_ms(r[f"{key}_p90_s"]) for r in pts], color=color, linestyle=style, marker="x",
                        alpha=0.5, label=f"{label} p90")
            axes[2].plot(rates, [r["goodput_rps"] for r in pts], color=color, linestyle=style, marker="o", label=label)
            if all("goodput_itl_rps" in r for r in pts):
                axes[2].plot(rates, [r["goodput_itl_rps"] for r in pts], color=color, linestyle=style, marker="x",
                             alpha=0.5, label=f"{label} (every ITL)")
        slo = wrows[0]
        axes[0].axhline(slo["ttft_slo_s"] * 1000, color="gray", linewidth=0.8, linestyle="--")
        axes[1].axhline(slo["itl_slo_s"] * 1000, color="gray", linewidth=0.8, linestyle="--")
        axes[0].set(title=f"{workload}: TTFT", xlabel="rate (req/s)", ylabel="ms")
        axes[1].set(title=f"{workload}: inter-token latency", xlabel="rate (req/s)", ylabel="ms")
        axes[2].set(title=f"{workload}: goodput", xlabel="rate (req/s)", ylabel="req/s in SLO (o: TPOT, x: every ITL)")
        axes[0].set_yscale("log")
        axes[1].set_yscale("log")
        axes[2].plot([0, max(r["rate"] for r in wrows)], [0, max(r["rate"] for r in wrows)], color="lightgray",
                     linewidth=0.8, label="offered rate")
        axes[2].legend(fontsize=7)
        axes[0].legend(fontsize=6)
        fig.tight_layout()
        path = out_dir / f"{prefix}_{workload}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


def _ms(x: float | None) -> float:
    return float("nan") if x is None else x * 1000


_COLUMNS = (("mode", "mode", None), ("routing", "routing", None), ("rate", "rate", None),
            ("goodput_rps", "goodput req/s", None), ("slo_attainment", "SLO met", "pct"),
            ("goodput_itl_rps", "goodput (every ITL) req/s", None),
            ("ttft_p50_s", "TTFT p50", "ms"), ("ttft_p99_s", "TTFT p99", "ms"), ("itl_p50_s", "ITL p50", "ms"),
            ("itl_p99_s", "ITL p99", "ms"), ("tpot_p90_s", "TPOT p90", "ms"), ("e2e_p50_s", "e2e p50", "ms"),
            ("throughput_tok_s", "out tok/s", None), ("prefix_hit_rate", "prefix hit", "pct"),
            ("num_failed", "failed", None))


def markdown(rows: list[dict]) -> str:
    """One table per workload, rows by rate then configuration."""
    out = []
    for workload in sorted({r["workload"] for r in rows}):
        wrows = sorted((r for r in rows if r["workload"] == workload), key=lambda r: (r["rate"], r["mode"], r["routing"]))
        first = wrows[0]
        out.append(f"**{workload}** (SLO: TTFT <= {first['ttft_slo_s'] * 1000:g} ms, TPOT <= "
                   f"{first['itl_slo_s'] * 1000:g} ms; {first['num_requests']} requests per run)\n")
        out.append("| " + " | ".join(h for _, h, _ in _COLUMNS) + " |")
        out.append("|" + "|".join("---" if u is None and k in ("mode", "routing") else "---:" for k, _, u in _COLUMNS) + "|")
        for r in wrows:
            out.append("| " + " | ".join(_cell(r.get(k), u) for k, _, u in _COLUMNS) + " |")
        out.append("")
    return "\n".join(out)


def _cell(x, unit) -> str:
    if x is None:
        return "-"
    if unit == "ms":
        return f"{x * 1000:.0f}" if x >= 0.1 else f"{x * 1000:.1f}"
    if unit == "pct":
        return f"{100 * x:.0f}%"
    return f"{x:g}" if isinstance(x, float) else str(x)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("results", type=Path, help="JSON lines written by benchmarks/serve.py")
    p.add_argument("--out-dir", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--prefix", default="serve")
    p.add_argument("--markdown", action="store_true", help="also print Markdown tables")
    args = p.parse_args(argv)
    rows = [r for r in read_rows(args.results) if "workload" in r]
    for path in plot(rows, args.out_dir, args.prefix):
        print(path, file=sys.stderr)
    if args.markdown:
        print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
