"""Aggregate a grid's final.json files into markdown tables (mean ± std over seeds) and plots.

    python experiments/report.py experiments/fmnist.json --markdown docs/RESULTS.md README.md --figures docs/figures

With --markdown FILE... the tables replace what is between each FILE's markers
`<!-- grid:<out> begin -->` and `<!-- grid:<out> end -->` (the whole report) or
`<!-- grid:<out>:headline begin -->` ... `end -->` (its first table), so the numbers in the
documents always come from the result files; without it they go to stdout. The aggregate also
goes to <out>/summary.csv.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import sys

from grid import load_grid, run_dir

METRICS = [("avg_nat_err", "avg nat"), ("worst_nat_err", "worst nat"), ("avg_bdy_err", "avg bdy"),
           ("worst_bdy_err", "worst bdy"), ("avg_rob_err", "avg rob"), ("worst_rob_err", "worst rob")]
HEADLINE = ["avg_nat_err", "worst_nat_err", "avg_rob_err", "worst_rob_err"]


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def collect(grid: dict) -> dict:
    """{(scenario, method): [final.json of each finished seed, with its first and last
    metrics.csv rows under 'first_epoch' / 'last_epoch' and the runner's wall time under 'seconds']}"""
    runs = {}
    for scenario in grid["scenarios"]:
        for method in grid["methods"]:
            finals = []
            for seed in grid["seeds"]:
                out = run_dir(grid, scenario, method, seed)
                if os.path.exists(os.path.join(out, "final.json")):
                    with open(os.path.join(out, "final.json")) as f:
                        finals.append(json.load(f))
                    if os.path.exists(os.path.join(out, "run.json")):
                        with open(os.path.join(out, "run.json")) as f:
                            finals[-1]["seconds"] = json.load(f)["seconds"]
                    metrics = os.path.join(out, "metrics.csv")
                    if os.path.exists(metrics):
                        with open(metrics, newline="") as f:
                            epochs = list(csv.DictReader(f))
                        finals[-1]["first_epoch"], finals[-1]["last_epoch"] = epochs[0], epochs[-1]
            runs[scenario, method] = finals
    return runs


def aggregate(runs: dict) -> dict:
    """{(scenario, method): {metric: (mean, std, n)}} over the seeds that finished."""
    agg = {}
    for key, finals in runs.items():
        if finals:
            agg[key] = {m: (*mean_std([f[m] for f in finals]), len(finals))
                        for m in [*dict(METRICS), "clean_acc", "pgd_acc"]}
    return agg


def is_aaa(method: str) -> bool:
    return method.upper().startswith("AAA")


def scenario_table(scenario: str, methods: list[str], agg: dict) -> list[str]:
    rows = [m for m in methods if (scenario, m) in agg]
    lines = ["| method | " + " | ".join(label for _, label in METRICS) + " | seeds |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    best = {k: min(agg[scenario, m][k][0] for m in rows) for k, _ in METRICS}
    for m in rows:
        cells = []
        for k, _ in METRICS:
            mean, sd, _n = agg[scenario, m][k]
            cell = f"{mean:.1f} ± {sd:.1f}"
            cells.append(f"**{cell}**" if mean == best[k] else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {agg[scenario, m]['avg_nat_err'][2]} |")
    return lines


def versus_table(scenarios: list[str], methods: list[str], agg: dict) -> list[str]:
    """Best AAA variant minus best adversarial baseline (not ERM), per scenario and metric, with
    the standard error of that difference; negative is better for AAA."""
    labels = dict(METRICS)
    lines = ["| scenario | " + " | ".join(labels[k] for k in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for sc in scenarios:
        cells = []
        for k in HEADLINE:
            aaa = [m for m in methods if is_aaa(m) and (sc, m) in agg]
            base = [m for m in methods if not is_aaa(m) and m.upper() != "ERM" and (sc, m) in agg]
            if not aaa or not base:
                cells.append("–")
                continue
            a = min(aaa, key=lambda m: agg[sc, m][k][0])
            b = min(base, key=lambda m: agg[sc, m][k][0])
            (ma, sa, na), (mb, sb, nb) = agg[sc, a][k], agg[sc, b][k]
            se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
            cells.append(f"{ma - mb:+.1f} ± {se:.1f} ({a} vs {b})")
        lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    return lines


def aaa_diagnostics_table(scenarios: list[str], methods: list[str], runs: dict) -> list[str]:
    """What the meta-network chose: the share of samples weighted more anti-adversarially than
    adversarially (b_i > a_i) in the first epoch (mean, and min-max over seeds: with a near-hard
    softmax the untrained meta-network's split is a per-seed draw) and in the last epoch, and the
    last epoch's mean bound eps_i."""
    aaa = [m for m in methods if is_aaa(m)]
    lines = ["| scenario | " + " | ".join(aaa) + " |", "|---|" + "---|" * len(aaa)]
    for sc in scenarios:
        cells = []
        for m in aaa:
            finals = [f for f in runs[sc, m] if "last_epoch" in f]
            if finals:
                first = [100 * float(f["first_epoch"]["frac_anti"]) for f in finals]
                last = sum(100 * float(f["last_epoch"]["frac_anti"]) for f in finals) / len(finals)
                eps = sum(float(f["last_epoch"]["mean_eps"]) for f in finals) / len(finals)
                cells.append(f"{sum(first) / len(first):.0f}% ({min(first):.0f}–{max(first):.0f}%) → "
                             f"{last:.1f}% / {eps:.4f}")
            else:
                cells.append("–")
        lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    return lines


def markdown(grid: dict, runs: dict, agg: dict) -> dict[str, str]:
    """The report's sections by marker suffix: '' the whole report, ':headline' its first table."""
    scenarios, methods = list(grid["scenarios"]), list(grid["methods"])
    n_runs = sum(v["avg_nat_err"][2] for v in agg.values())
    total = len(scenarios) * len(methods) * len(grid["seeds"])
    minutes = sum(f.get("seconds", 0) for finals in runs.values() for f in finals) / 60
    head = [f"Errors in % (lower is better), mean ± std over seeds. "
            f"{n_runs} of {total} runs finished" + (f", {minutes:.0f} min of wall time in all." if minutes else "."),
            "", "**Best AAA variant minus best adversarial baseline** (PGD-AT, TRADES, FRL; each picked per "
            "cell, so both sides get their best), ± the standard error of the difference; negative favours AAA:",
            "", *versus_table(scenarios, methods, agg), ""]
    out = [*head, "Per scenario (bold: best in the column):", ""]
    for sc in scenarios:
        if any((sc, m) in agg for m in methods):
            out += [f"**{sc}** ({' '.join(grid['scenarios'][sc]) or 'no label noise, balanced'})", "",
                    *scenario_table(sc, methods, agg), ""]
    if any(is_aaa(m) for m in methods):
        out += ["**What the meta-network chose**: share of training samples with anti-adversarial weight b_i "
                "above adversarial weight a_i in the first epoch (mean over seeds, min–max) → in the last epoch "
                "(mean) / mean bound ε_i in the last epoch:", "",
                *aaa_diagnostics_table(scenarios, methods, runs), ""]
    return {"": "\n".join(out).rstrip() + "\n", ":headline": "\n".join(head).rstrip() + "\n"}


def write_between_markers(path: str, tag: str, sections: dict[str, str]) -> None:
    """Replace the text between `<!-- grid:<tag><suffix> begin/end -->` for every section whose
    markers the document has; at least one must be there."""
    with open(path) as f:
        doc = f.read()
    found = False
    for suffix, text in sections.items():
        begin, end = f"<!-- grid:{tag}{suffix} begin -->", f"<!-- grid:{tag}{suffix} end -->"
        if begin in doc and end in doc:
            head, rest = doc.split(begin, 1)
            doc = f"{head}{begin}\n{text}{end}{rest.split(end, 1)[1]}"
            found = True
    if not found:
        raise SystemExit(f"error: {path} has no '<!-- grid:{tag} begin -->' ... '<!-- grid:{tag} end -->' markers "
                         f"(or ':headline' ones) to put the tables between")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(doc)
    os.replace(tmp, path)


def write_summary_csv(path: str, agg: dict) -> None:
    keys = [*dict(METRICS), "clean_acc", "pgd_acc"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scenario", "method", "seeds", *[f"{k}_{s}" for k in keys for s in ("mean", "std")]])
        for (sc, m), v in agg.items():
            w.writerow([sc, m, v["avg_nat_err"][2], *[f"{v[k][i]:.4f}" for k in keys for i in (0, 1)]])


def plot(grid: dict, runs: dict, agg: dict, figures: str, prefix: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = [sc for sc in grid["scenarios"] if any((sc, m) in agg for m in grid["methods"])]
    methods = list(grid["methods"])
    cols = min(3, len(scenarios))
    rows = math.ceil(len(scenarios) / cols)
    os.makedirs(figures, exist_ok=True)

    def figure(name: str, title: str, draw) -> str:
        """One panel per scenario, drawn by draw(ax, scenario); returns the saved file."""
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, sc in zip(axes.flat, scenarios):
            draw(ax, sc)
            ax.set_title(sc)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(scenarios):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(figures, f"{prefix}_{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path

    def classwise(ax, sc):
        for m in methods:
            finals = runs[sc, m]
            if finals:
                per_class = [100 - sum(f["classwise_pgd_acc"][c] for f in finals) / len(finals)
                             for c in range(len(finals[0]["classwise_pgd_acc"]))]
                ax.plot(range(len(per_class)), per_class, marker="o", ms=3, ls="-" if is_aaa(m) else "--", label=m)
        ax.set(xlabel="class", ylabel="robust error (%)", ylim=(0, 100))
        if grid.get("class_names"):
            ax.set_xticks(range(len(grid["class_names"])), grid["class_names"], rotation=45, fontsize=7)

    def tradeoff(ax, sc):
        for m in methods:
            if (sc, m) in agg:
                (cx, sx, _), (ry, sy, _) = agg[sc, m]["clean_acc"], agg[sc, m]["pgd_acc"]
                ax.errorbar(cx, ry, xerr=sx, yerr=sy, fmt="o" if is_aaa(m) else "s", ms=5, capsize=2, label=m)
        ax.set(xlabel="natural accuracy (%)", ylabel="robust accuracy (%)")

    return [figure("classwise_robust_error", "class-wise robust error (PGD), mean over seeds", classwise),
            figure("natural_vs_robust", "natural vs robust accuracy, mean ± std over seeds", tradeoff)]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the grid config the runs came from")
    p.add_argument("--markdown", nargs="+", default=[], help="documents to put the tables in (between their markers)")
    p.add_argument("--figures", default=None, help="directory for the plots")
    args = p.parse_args(argv)
    grid = load_grid(args.config)
    runs = collect(grid)
    agg = aggregate(runs)
    if not agg:
        raise SystemExit(f"error: no finished runs under {grid['out']}")
    tag = os.path.basename(os.path.normpath(grid["out"]))
    text = markdown(grid, runs, agg)
    write_summary_csv(os.path.join(grid["out"], "summary.csv"), agg)
    for path in args.markdown:
        write_between_markers(path, tag, text)
        print(f"tables written to {path}")
    if not args.markdown:
        sys.stdout.write(text[""])
    if args.figures:
        for path in plot(grid, runs, agg, args.figures, tag):
            print(f"plot written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
