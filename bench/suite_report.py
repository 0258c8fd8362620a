"""What ``kiln bench suite`` takes and gives: its arguments (no torch import, for the CLI's
parser), the per-model table, the dashboard-style summary line per suite (pass rate, geomean
speedups, geomean compile times) and a bar chart."""
from __future__ import annotations

import argparse
import math


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--only", help="comma-separated model names (default: all; see kiln.bench.suite_models)")
    ap.add_argument("--precision", default="fp32", help="fp32, bf16 or fp32,bf16 (default fp32)")
    ap.add_argument("--threads", default="1", help="thread counts, e.g. 1,2 (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny configs, correctness only, in this process (CI)")
    ap.add_argument("--repeats", type=int, help="timed rounds per engine (default 20)")
    ap.add_argument("--no-inductor", action="store_true", help="skip Inductor (its compile and timing)")
    ap.add_argument("--json", metavar="FILE")
    ap.add_argument("--markdown", metavar="FILE")
    ap.add_argument("--plot", metavar="PNG", help="bar chart of Kiln's speedups")


def _geomean(xs) -> float | None:
    xs = [x for x in xs if x and x > 0 and math.isfinite(x)]
    return math.exp(sum(map(math.log, xs)) / len(xs)) if xs else None


def speedups(row: dict, threads: str) -> tuple[float | None, float | None]:
    """Kiln's speedup over eager and over Inductor at one thread count (None where not timed)."""
    lat = row.get("latency_ms", {}).get(threads, {})
    k = lat.get("kiln")
    if not k:
        return None, None
    e, i = lat.get("eager"), lat.get("inductor")
    return (e / k if e else None), (i / k if i else None)


def summarize(res: dict) -> list[dict]:
    """One line per (suite, precision), and one for all suites together."""
    out = []
    rows = res["rows"]
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    for prec in res["precisions"]:
        for suite in suites + ["all"]:
            rs = [r for r in rows if r["precision"] == prec and (suite == "all" or r["suite"] == suite)]
            if not rs:
                continue
            line = {"suite": suite, "precision": prec, "models": len(rs),
                    "passed": sum(r["status"] == "pass" for r in rs),
                    "no_fallbacks": sum(r["status"] != "error" and not r.get("fallbacks") for r in rs),
                    "geomean_kiln_compile_s": _geomean(r.get("compile_s", {}).get("kiln_cold") for r in rs),
                    "geomean_inductor_compile_s": _geomean(r.get("compile_s", {}).get("inductor") for r in rs)}
            for th in map(str, res["threads"]):
                passed = [r for r in rs if r["status"] == "pass"]
                line[f"geomean_vs_eager@{th}"] = _geomean(speedups(r, th)[0] for r in passed)
                line[f"geomean_vs_inductor@{th}"] = _geomean(speedups(r, th)[1] for r in passed)
            out.append(line)
    return out


def _f(x, fmt="{:.2f}") -> str:
    return "—" if x is None else fmt.format(x)


def summary_lines(res: dict) -> list[str]:
    lines = []
    for s in res["summary"]:
        parts = [f"{s['suite']} {s['precision']}: pass {s['passed']}/{s['models']}",
                 f"no fallbacks {s['no_fallbacks']}/{s['models']}"]
        for th in map(str, res["threads"]):
            parts.append(f"{th} thread(s): geomean {_f(s[f'geomean_vs_eager@{th}'])}x vs eager, "
                         f"{_f(s[f'geomean_vs_inductor@{th}'])}x vs Inductor")
        parts.append(f"geomean compile {_f(s['geomean_kiln_compile_s'], '{:.1f}')} s Kiln, "
                     f"{_f(s['geomean_inductor_compile_s'], '{:.1f}')} s Inductor")
        lines.append("; ".join(parts))
    return lines


def _warm_cell(cs: dict) -> str:
    """The warm compile's wall seconds, and its CPU seconds where recorded."""
    if cs.get("kiln_warm") is None:
        return "—"
    cpu = cs.get("kiln_warm_cpu")
    return f"{cs['kiln_warm']:.1f}" + ("" if cpu is None else f" ({cpu:.1f} CPU)")


def _bf16_cell(check: dict | None) -> str:
    """The bf16 check's output nearest to failing: Kiln's and eager bf16's RMSE against the
    fp64 run, and the bound (3x eager's + 1e-4); "—" for fp32 rows."""
    if not check or "kiln_rmse" not in check:
        return "—"
    ref = "" if check.get("reference", "fp64") == "fp64" else " vs fp32"
    return f"{check['kiln_rmse']:.1e} / {check['eager_bf16_rmse']:.1e} ({check['bound']:.1e}){ref}"


def markdown(res: dict) -> str:
    th = [str(t) for t in res["threads"]]
    head = ["model", "suite", "prec", "status", "rel err", "bf16 RMSE Kiln / eager (bound)", "fallbacks"]
    for t in th:
        head += [f"eager ms @{t}", f"Inductor ms @{t}", f"Kiln ms @{t}", f"vs eager @{t}", f"vs Inductor @{t}"]
    head += ["Kiln cold s", "Kiln warm s", "Inductor s", "RSS eager MB", "RSS compile MB"]
    lines = [f"Kiln model suite ({'quick configs, correctness only' if res['quick'] else 'full configs'}; "
             f"batch 1; medians of {res['repeats']} interleaved rounds; {res['date']}, torch {res['torch']})", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        fb = ", ".join(f"{op.removeprefix('aten.')} x{n}" for op, n in r.get("fallbacks", {}).items()) or "none"
        status = r["status"] + (f": {r['error']}" if r.get("error") else "")
        cells = [r["model"], r["suite"], r["precision"], status.replace("|", "/"),
                 _f(r.get("rel_err"), "{:.1e}"), _bf16_cell(r.get("bf16_check")), fb]
        for t in th:
            lat = r.get("latency_ms", {}).get(t, {})
            ve, vi = speedups(r, t)
            cells += [_f(lat.get("eager")), _f(lat.get("inductor")), _f(lat.get("kiln")), _f(ve, "{:.2f}x"),
                      _f(vi, "{:.2f}x")]
        cs, rss = r.get("compile_s", {}), r.get("rss_mb", {})
        cells += [_f(cs.get("kiln_cold"), "{:.1f}"), _warm_cell(cs),
                  _f(cs.get("inductor"), "{:.1f}"), _f(rss.get("eager_peak"), "{:.0f}"),
                  _f(rss.get("kiln_compile_peak"), "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Summary (geomeans over the models that pass):", ""]
    lines += [f"- {s}" for s in summary_lines(res)]
    peers = [(r["model"], r["precision"], e, m) for r in res["rows"] for e, m in r.get("errors", {}).items()]
    if peers:
        lines += ["", "Peers that failed:"] + [f"- {m} {p} / {e}: {msg}" for m, p, e, msg in peers]
    return "\n".join(lines) + "\n"


def plot(res: dict, path: str) -> None:
    """Bar chart: Kiln's speedup over eager and over Inductor per model (first thread count)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    th = str(res["threads"][0])
    rows = [r for r in res["rows"] if r.get("latency_ms", {}).get(th)]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * len(rows) + 2), 4.5))
    labels = [f"{r['model']}" + ("" if len(res["precisions"]) == 1 else f" {r['precision']}") for r in rows]
    xs = range(len(rows))
    ve = [speedups(r, th)[0] or 0 for r in rows]
    vi = [speedups(r, th)[1] or 0 for r in rows]
    ax.bar([x - 0.2 for x in xs], ve, 0.4, label="Kiln vs eager")
    ax.bar([x + 0.2 for x in xs], vi, 0.4, label="Kiln vs Inductor (freezing)")
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=8)
    ax.set_ylabel(f"speedup ({th} thread(s), batch 1)")
    ax.set_title("Kiln model suite" + (" (no timings: --quick)" if not rows else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
