"""Aggregate a grid's final.json files into markdown tables (mean ± std over seeds) and plots.

    python -m aaa_fast.study report experiments/fmnist.json --markdown docs/RESULTS.md README.md --figures docs/figures

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

from ..checkpoint import atomic_write
from ..methods import get_method
from ..plots import save_figure
from ..train import build_parser
from .grid import load_grid, method_spec, run_dir, runs_in

METRICS = [("avg_nat_err", "avg nat"), ("worst_nat_err", "worst nat"), ("avg_bdy_err", "avg bdy"),
           ("worst_bdy_err", "worst bdy"), ("avg_rob_err", "avg rob"), ("worst_rob_err", "worst rob")]
HEADLINE = ["avg_nat_err", "worst_nat_err", "avg_rob_err", "worst_rob_err"]


def mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    sd = math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return m, sd


def finite(record, key: str) -> bool:
    value = record.get(key) if isinstance(record, dict) else None
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def read_json(path: str, damaged: list[str]):
    """The JSON at `path`, or None with '<path>: <reason>' added to `damaged` when it cannot be read."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or bytes that are not text
        damaged.append(f"{path}: {type(exc).__name__}: {exc}")
        return None


def collect(grid: dict, damaged: list[str] | None = None) -> dict:
    """{(scenario, method): [final.json of each finished seed, with its metrics.csv rows under
    'epochs' (the first and last also as 'first_epoch' / 'last_epoch'), the runner's wall time
    under 'seconds' and the training device under 'device']}. A run whose final.json cannot be
    read or lacks a figure is left out and named in `damaged` (file and reason), as is an
    unreadable run.json, config.json or metrics.csv beside a good final.json (its figures count)."""
    damaged = [] if damaged is None else damaged
    runs = {}
    for scenario in grid["scenarios"]:
        for method in grid["methods"]:
            if not runs_in(grid, scenario, method):
                continue
            finals = []
            for seed in grid["seeds"]:
                out = run_dir(grid, scenario, method, seed)
                path = os.path.join(out, "final.json")
                if not os.path.exists(path) or (final := read_json(path, damaged)) is None:
                    continue
                missing = [k for k in (*dict(METRICS), "clean_acc", "pgd_acc") if not finite(final, k)]
                if missing:
                    damaged.append(f"{path}: no finite {', '.join(missing)}")
                    continue
                final["seed"] = seed
                finals.append(final)
                if os.path.exists(os.path.join(out, "run.json")):
                    if isinstance(run := read_json(os.path.join(out, "run.json"), damaged), dict) and "seconds" in run:
                        final["seconds"] = run["seconds"]
                if os.path.exists(os.path.join(out, "config.json")):
                    if isinstance(config := read_json(os.path.join(out, "config.json"), damaged), dict):
                        final["device"] = str(config.get("device", "?")).split(":")[0]
                metrics = os.path.join(out, "metrics.csv")
                if os.path.exists(metrics):
                    try:
                        with open(metrics, newline="") as f:
                            epochs = list(csv.DictReader(f))
                    except (OSError, ValueError, csv.Error) as exc:
                        damaged.append(f"{metrics}: {type(exc).__name__}: {exc}")
                        epochs = []
                    if epochs:
                        final["epochs"] = epochs
                        final["first_epoch"], final["last_epoch"] = epochs[0], epochs[-1]
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


def registry_role(grid: dict, method: str) -> str:
    """A grid method's role: that of the --method its arguments run, as the training CLI parses
    them (aaa_fast.methods' registry)."""
    args = method_spec(grid, method)["args"]
    return get_method(build_parser().parse_known_args(args)[0].method).role


def roles(grid: dict) -> dict[str, list[str]]:
    """Which methods are AAA variants, adversarial baselines and controls: the config's "report"
    entry when it has one, else the role of the method each runs (the registry's: aaa, baseline,
    control; ERM is none of them).
    "versus" names the AAA variants the best-minus-best table picks from (default: all of them), so
    a variant trained at another point of the trade-off, e.g. a smaller lambda than the baselines',
    cannot win the natural-error columns by giving up robustness."""
    given = grid.get("report", {})
    role = {m: registry_role(grid, m) for m in grid["methods"]}
    aaa = given.get("aaa", [m for m, r in role.items() if r == "aaa"])
    baselines = given.get("baselines", [m for m, r in role.items() if r == "baseline" and m not in aaa])
    return {"aaa": aaa, "versus": given.get("versus", aaa), "baselines": baselines,
            "controls": given.get("controls", [m for m, r in role.items() if r == "control" and m not in aaa])}


def scenario_table(scenario: str, methods: list[str], agg: dict) -> list[str]:
    rows = [m for m in methods if (scenario, m) in agg]
    lines = ["| method | " + " | ".join(label for _, label in METRICS) + " | seeds |",
             "|---|" + "---|" * (len(METRICS) + 1)]
    best = {k: min(agg[scenario, m][k][0] for m in rows) for k, _ in METRICS}
    for m in rows:
        cells = []
        for k, _ in METRICS:
            mean, sd, n = agg[scenario, m][k]
            cell = f"{mean:.1f} ± {sd:.1f}" if n > 1 else f"{mean:.1f}"  # one seed: no spread to show
            cells.append(f"**{cell}**" if mean == best[k] else cell)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {agg[scenario, m]['avg_nat_err'][2]} |")
    return lines


def versus_table(scenarios: list[str], candidates: list[str], baselines: list[str], agg: dict) -> list[str]:
    """Best candidate (AAA variant, or control) minus best adversarial baseline, per scenario and
    metric, with the standard error of that difference; negative is better for the candidate."""
    labels = dict(METRICS)
    lines = ["| scenario | " + " | ".join(labels[k] for k in HEADLINE) + " |", "|---|" + "---|" * len(HEADLINE)]
    for sc in scenarios:
        cells = []
        for k in HEADLINE:
            aaa = [m for m in candidates if (sc, m) in agg]
            base = [m for m in baselines if (sc, m) in agg]
            if not aaa or not base:
                cells.append("–")
                continue
            a = min(aaa, key=lambda m: agg[sc, m][k][0])
            b = min(base, key=lambda m: agg[sc, m][k][0])
            (ma, sa, na), (mb, sb, nb) = agg[sc, a][k], agg[sc, b][k]
            if min(na, nb) < 2:  # a one-seed side has no spread, so the difference has no error estimate
                cells.append(f"{ma - mb:+.1f} ({a} vs {b}, one seed)")
                continue
            se = math.sqrt(sa ** 2 / na + sb ** 2 / nb)
            cells.append(f"{ma - mb:+.1f} ± {se:.1f} ({a} vs {b})")
        lines.append(f"| {sc} | " + " | ".join(cells) + " |")
    return lines


def aaa_diagnostics_table(scenarios: list[str], aaa: list[str], runs: dict) -> list[str]:
    """What the meta-network chose: the share of samples weighted more anti-adversarially than
    adversarially (b_i > a_i) in the first epoch (mean, and min-max over seeds: with a near-hard
    softmax the untrained meta-network's split is a per-seed draw) and in the last epoch, and the
    last epoch's mean bound eps_i."""
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


MECHANISM = [("anti_share_corrupted", "anti share, corrupted rows"), ("anti_share_clean", "clean rows"),
             ("anti_auroc_corrupted", "AUROC of b for corrupted"), ("anti_share_tail", "tail classes"),
             ("anti_share_head", "head classes"), ("grad_band", "rows in gradient band")]


def mechanism_table(scenarios: list[str], methods: list[str], runs: dict) -> list[str]:
    """Last-epoch mechanism diagnostics, mean over seeds (blank where a scenario has no such group)."""
    lines = ["| scenario | method | " + " | ".join(label for _, label in MECHANISM) + " |",
             "|---|---|" + "---|" * len(MECHANISM)]
    for sc in scenarios:
        for m in methods:
            finals = [f for f in runs.get((sc, m), []) if "last_epoch" in f and "grad_band" in f["last_epoch"]]
            if not finals:
                continue
            cells = []
            for key, _ in MECHANISM:
                values = [float(f["last_epoch"][key]) for f in finals if f["last_epoch"].get(key, "") != ""]
                cells.append(f"{sum(values) / len(values):.2f}" if values else "–")
            if any(c != "–" for c in cells[:-1]):
                lines.append(f"| {sc} | {m} | " + " | ".join(cells) + " |")
    return lines


# two-sided 95% quantiles of Student's t by degrees of freedom (n - 1 for n pairs); 2.0 beyond
T95 = {1: 12.71, 2: 4.30, 3: 3.18, 4: 2.78, 5: 2.57, 6: 2.45, 7: 2.36, 8: 2.31, 9: 2.26, 10: 2.23}


def paired_table(scenarios: list[str], pairs: list[list[str]], runs: dict) -> list[str]:
    """Method A minus method B seed by seed (the same seed: the same data, label noise and initial
    weights), mean shift ± its standard error over the paired seeds, and B's seed spread (std) for
    scale; a shift whose 95% t-interval excludes 0 is marked beyond seed noise. Then B's wall time
    over A's (runner seconds, mean of the per-seed ratios) and A's share of attack rows attacked and
    of the objective dropped (min_row_weight's columns, mean over seeds and epochs)."""
    labels = dict(METRICS)
    lines = ["| scenario | A − B | seeds | " + " | ".join(labels[k] for k in HEADLINE)
             + " | wall time B / A | A: rows attacked, loss dropped |", "|---|---|---|" + "---|" * (len(HEADLINE) + 2)]
    for sc in scenarios:
        for a, b in pairs:
            by_seed = {f["seed"]: f for f in runs.get((sc, b), [])}
            both = [(f, by_seed[f["seed"]]) for f in runs.get((sc, a), []) if f["seed"] in by_seed]
            if not both:
                continue
            n = len(both)
            cells = []
            for k in HEADLINE:
                mean, sd = mean_std([fa[k] - fb[k] for fa, fb in both])
                if n < 2:
                    cells.append(f"{mean:+.1f} (one seed)")
                    continue
                se = sd / math.sqrt(n)
                beyond = abs(mean) > T95.get(n - 1, 2.0) * se
                cells.append(f"{mean:+.1f} ± {se:.1f} (spread {mean_std([fb[k] for _, fb in both])[1]:.1f})"
                             + (" **beyond noise**" if beyond else ""))
            timed = [fb["seconds"] / fa["seconds"] for fa, fb in both if fa.get("seconds") and fb.get("seconds")]
            cells.append(f"{sum(timed) / len(timed):.2f}×" if timed else "–")
            shares = []
            for key, digits in (("rows_attacked", 1), ("dropped_share", 2)):  # dropped shares are small
                values = [float(row[key]) for fa, _ in both for row in fa.get("epochs", []) if row.get(key, "") != ""]
                shares.append(f"{100 * sum(values) / len(values):.{digits}f}%" if values else "–")
            cells.append(", ".join(shares) if shares != ["–", "–"] else "–")
            lines.append(f"| {sc} | {a} − {b} | {n} | " + " | ".join(cells) + " |")
    return lines


def paired_section(scenarios: list[str], pairs: list[list[str]], runs: dict) -> list[str]:
    return ["**Paired by seed** (A minus B on the same seeds, in points; mean shift ± its standard error, and B's "
            "spread over seeds; **beyond noise**: the shift's 95% t-interval excludes 0):", "",
            *paired_table(scenarios, pairs, runs), ""]


def markdown(grid: dict, runs: dict, agg: dict) -> dict[str, str]:
    """The report's sections by marker suffix: '' the whole report, ':headline' its first table."""
    scenarios, methods = list(grid["scenarios"]), list(grid["methods"])
    role = roles(grid)
    n_runs = sum(v["avg_nat_err"][2] for v in agg.values())
    total = sum(runs_in(grid, sc, m) for sc in scenarios for m in methods) * len(grid["seeds"])
    minutes = sum(f.get("seconds", 0) for finals in runs.values() for f in finals) / 60
    devices: dict[str, int] = {}
    for finals in runs.values():
        for f in finals:
            if "device" in f:
                devices[f["device"]] = devices.get(f["device"], 0) + 1
    where = f" ({', '.join(f'{n} on {d}' for d, n in sorted(devices.items()))})" if devices else ""
    head = [f"Errors in % (lower is better), mean ± std over seeds. "
            f"{n_runs} of {total} runs finished{where}" + (f", {minutes:.0f} min of runner wall time in all."
                                                            if minutes else "."), ""]
    if role["baselines"]:
        head += [f"**Best AAA variant minus best adversarial baseline** ({', '.join(role['versus'])} against "
                 f"{', '.join(role['baselines'])}; each picked per cell, so both sides get their best), ± the "
                 "standard error of the difference; negative favours AAA:",
                 "", *versus_table(scenarios, role["versus"], role["baselines"], agg), ""]
    elif grid.get("paired"):  # a grid of paired arms, no baselines: the comparison is its headline
        head += paired_section(scenarios, grid["paired"], runs)
    out = [*head]
    if role["controls"] and role["baselines"]:
        out += ["**Controls minus best adversarial baseline** (the oracle's headroom: a perfect selector):", "",
                *versus_table(scenarios, role["controls"], role["baselines"], agg), ""]
    out += ["Per scenario (bold: best in the column):", ""]
    for sc in scenarios:
        if any((sc, m) in agg for m in methods):
            out += [f"**{sc}** ({' '.join(grid['scenarios'][sc]) or 'no label noise, balanced'})", "",
                    *scenario_table(sc, methods, agg), ""]
    if role["aaa"]:
        out += ["**What the meta-network chose**: share of training samples with anti-adversarial weight b_i "
                "above adversarial weight a_i in the first epoch (mean over seeds, min–max) → in the last epoch "
                "(mean) / mean bound ε_i in the last epoch:", "",
                *aaa_diagnostics_table(scenarios, role["aaa"], runs), ""]
    if grid.get("paired") and role["baselines"]:
        out += paired_section(scenarios, grid["paired"], runs)
    mechanism = mechanism_table(scenarios, [*role["aaa"], *role["controls"]], runs)
    if len(mechanism) > 2:
        out += ["**Mechanism** (last epoch, mean over seeds): share of rows sent to the anti term (b_i > a_i) "
                "among corrupted-label vs clean rows and tail vs head classes, how well b_i ranks the corrupted "
                "rows (AUROC, 0.5 = chance), and the share of rows still inside the softmax's gradient band:", "",
                *mechanism, ""]
    return {"": "\n".join(out).rstrip() + "\n", ":headline": "\n".join(head).rstrip() + "\n"}


def collect_evaluations(grid: dict, damaged: list[str]) -> dict:
    """{(scenario, method): [the evaluation JSON (experiments/evaluate_grid.py) of each evaluated
    seed, with its masking report under 'masking' where one was written]}"""
    name = grid["evaluation"]["name"]
    evals = {}
    for scenario in grid["scenarios"]:
        for method in grid["methods"]:
            if not runs_in(grid, scenario, method):
                continue
            found = []
            for seed in grid["seeds"]:
                out = run_dir(grid, scenario, method, seed)
                path = os.path.join(out, f"{name}.json")
                if not os.path.exists(path) or not isinstance(result := read_json(path, damaged), dict):
                    continue
                found.append(result)
                if os.path.exists(os.path.join(out, "masking_report.json")):
                    if isinstance(report := read_json(os.path.join(out, "masking_report.json"), damaged), dict):
                        result["masking"] = report
            if found:
                evals[scenario, method] = found
    return evals


def errors_of(classwise_acc: list[float]) -> tuple[float, float]:
    """(average, worst-class) error in % from class-wise accuracies in %."""
    return 100 - sum(classwise_acc) / len(classwise_acc), 100 - min(classwise_acc)


def attack_errors(ev: dict) -> dict[str, tuple[float, float]]:
    """(average, worst-class) robust error under PGD, the fast AutoAttack (APGD-CE + APGD-T: after
    the standard run's second attack when the standard ran) and the standard one where it ran."""
    out = {"pgd": (ev["avg_rob_err"], ev["worst_rob_err"]),
           "fast": errors_of(ev["classwise_aa_acc_after"]["apgd-t"])}
    if ev["aa_version"] == "standard":
        out["standard"] = (ev["aa_avg_rob_err"], ev["aa_worst_rob_err"])
    return out


def mean_of(evs: list[dict], key: str, i: int) -> float | None:
    values = [attack_errors(e)[key][i] for e in evs if key in attack_errors(e)]
    return sum(values) / len(values) if values else None


def attacks_table(grid: dict, evals: dict) -> list[str]:
    """PGD vs AutoAttack per scenario and method, and the gap (AutoAttack minus PGD)."""
    rows = ["| scenario | method | seeds | clean acc | PGD avg | AA avg | gap | PGD worst | AA worst | gap | "
            "AA standard avg / worst |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for (sc, m), evs in evals.items():
        clean = sum(e["clean_acc"] for e in evs) / len(evs)
        pa, fa, pw, fw = (mean_of(evs, k, i) for k, i in (("pgd", 0), ("fast", 0), ("pgd", 1), ("fast", 1)))
        sa, sw = mean_of(evs, "standard", 0), mean_of(evs, "standard", 1)
        std = f"{sa:.1f} / {sw:.1f}" if sa is not None else ""
        rows.append(f"| {sc} | {m} | {len(evs)} | {clean:.1f} | {pa:.1f} | {fa:.1f} | {fa - pa:+.1f} | {pw:.1f} | "
                    f"{fw:.1f} | {fw - pw:+.1f} | {std} |")
    return rows


def ranking_table(grid: dict, evals: dict) -> list[str]:
    """Best AAA variant minus best baseline (each picked per cell) under PGD and under AutoAttack."""
    role = roles(grid)
    rows = ["| scenario | attack | avg rob err | worst rob err |", "|---|---|---|---|"]
    for sc in grid["scenarios"]:
        for key, name in (("pgd", "PGD-20"), ("fast", "AutoAttack (APGD-CE + APGD-T)")):
            cells = []
            for i in (0, 1):
                best = [min((v for m in group if (sc, m) in evals and (v := mean_of(evals[sc, m], key, i)) is not None),
                            default=None) for group in (role["versus"], role["baselines"])]
                cells.append("" if None in best else f"{best[0] - best[1]:+.1f}")
            if any(cells):
                rows.append(f"| {sc} | {name} | {cells[0]} | {cells[1]} |")
    return rows


def masking_lines(evals: dict) -> list[str]:
    out = []
    for (sc, m), evs in evals.items():
        for ev in evs:
            rep = ev.get("masking")
            if rep is None:
                continue
            fired = [k for k, f in rep["flags"].items() if f["fired"]]
            accs = ", ".join(f"{k} {v:.1f}%" for k, v in rep["accuracy"].items())
            sweep = ", ".join(f"{p['eps']:.3g}: {p['apgd_ce_acc']:.1f}%" for p in rep["eps_sweep"])
            out.append(f"- {sc} / {m} ({rep['test_images']} images, eps {rep['eps']:.3g}): "
                       + (f"**masking suspected** ({', '.join(fired)})" if fired else "no sign of gradient masking")
                       + f". Accuracy: {accs}. APGD-CE against eps: {sweep}.")
    return out


def evaluation_markdown(grid: dict, evals: dict) -> str:
    spec = grid["evaluation"]
    seeds = sorted({len(v) for v in evals.values()})
    out = [f"Robust error in % under PGD-{evals and next(iter(evals.values()))[0]['eval_steps']} and AutoAttack "
           f"(fp32, the same class-balanced {spec['test_subset']} test images for every run; AA avg/worst: "
           "APGD-CE + APGD-T, the standard version's first two attacks; AA standard: all four, where run); "
           f"{sum(len(v) for v in evals.values())} runs evaluated, {'/'.join(map(str, seeds))} seed(s) per cell; "
           "gap = AutoAttack minus PGD (positive: PGD overstated robustness):", "",
           *attacks_table(grid, evals), "",
           "**Best AAA variant minus best baseline** under each attack (negative favours AAA):", "",
           *ranking_table(grid, evals), ""]
    masking = masking_lines(evals)
    if masking:
        out += ["**Gradient-masking checks**:", "", *masking, ""]
    return "\n".join(out).rstrip() + "\n"


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
    with atomic_write(path) as f:
        f.write(doc)


def write_summary_csv(path: str, agg: dict) -> None:
    keys = [*dict(METRICS), "clean_acc", "pgd_acc"]
    with atomic_write(path, newline="") as f:
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
    role = roles(grid)

    def is_aaa(m: str) -> bool:
        return m in role["aaa"]
    os.makedirs(figures, exist_ok=True)

    def figure(name: str, title: str, draw, panels: list[str] = scenarios) -> str:
        """One panel per scenario, drawn by draw(ax, scenario); returns the saved file."""
        cols = min(3, len(panels))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.6 * rows), squeeze=False)
        for ax, sc in zip(axes.flat, panels):
            draw(ax, sc)
            ax.set_title(sc)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        for ax in axes.flat:  # one legend, on each panel with lines of its own (the methods differ)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
                if panels is scenarios:
                    break
        fig.suptitle(title)
        fig.tight_layout()
        path = os.path.join(figures, f"{prefix}_{name}.png")
        save_figure(fig, path)
        plt.close(fig)
        return path

    def classwise(ax, sc):
        for m in methods:
            finals = runs.get((sc, m))
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

    def mechanism(ax, sc):
        """Anti share over epochs: corrupted vs clean rows (noise) or tail vs head classes (long tail)."""
        for m in [*role["aaa"], *role["controls"]]:
            finals = [f for f in runs.get((sc, m), []) if f.get("epochs") and "grad_band" in f["epochs"][0]]
            for key, style in (("anti_share_corrupted", "-"), ("anti_share_clean", ":"), ("anti_share_tail", "-"),
                               ("anti_share_head", ":")):
                if finals and all(row.get(key, "") != "" for f in finals for row in f["epochs"]):
                    epochs = range(1, len(finals[0]["epochs"]) + 1)
                    mean = [sum(float(f["epochs"][e - 1][key]) for f in finals) / len(finals) for e in epochs]
                    ax.plot(list(epochs), mean, ls=style, marker="o", ms=3, label=f"{m}: {key[11:]}")
        ax.set(xlabel="epoch", ylabel="share sent to the anti term", ylim=(-0.02, 1.02))

    paths = [figure("classwise_robust_error", "class-wise robust error (PGD), mean over seeds", classwise),
             figure("natural_vs_robust", "natural vs robust accuracy, mean ± std over seeds", tradeoff)]
    grouped = [sc for sc in scenarios if any(f.get("epochs") and f["epochs"][-1].get(key, "") != ""
                                              for m in [*role["aaa"], *role["controls"]] for f in runs.get((sc, m), [])
                                              for key in ("anti_share_corrupted", "anti_share_tail"))]
    if grouped:
        paths.append(figure("mechanism", "anti share by group (solid: corrupted / tail; dotted: clean / head), "
                            "mean over seeds", mechanism, grouped))
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m aaa_fast.study report", description=__doc__.split("\n\n")[0])
    p.add_argument("config", help="the grid config the runs came from")
    p.add_argument("--markdown", nargs="+", default=[], help="documents to put the tables in (between their markers)")
    p.add_argument("--figures", default=None, help="directory for the plots")
    args = p.parse_args(argv)
    for path in args.markdown:  # before any work: a document the tables go into must exist (with markers)
        if not os.path.isfile(path):
            raise SystemExit(f"error: --markdown {path}: no such file (the tables go between markers in an "
                             "existing document)")
    if args.figures and os.path.exists(args.figures) and not os.path.isdir(args.figures):
        raise SystemExit(f"error: --figures {args.figures} is a file, not a directory")
    grid = load_grid(args.config)
    damaged: list[str] = []
    runs = collect(grid, damaged)
    agg = aggregate(runs)
    if not agg:
        raise SystemExit(f"error: no finished runs under {grid['out']}")
    tag = os.path.basename(os.path.normpath(grid["out"]))
    text = markdown(grid, runs, agg)
    if isinstance(grid.get("evaluation"), dict) and (evals := collect_evaluations(grid, damaged)):
        text[":attacks"] = evaluation_markdown(grid, evals)
        text[""] = text[":attacks"] + "\n" + text[""]
    if damaged:
        text[""] += ("\n**Damaged runs, not counted** (fix or rerun them): "
                     + "; ".join(f"`{d}`" for d in damaged) + "\n")
        for d in damaged:
            print(f"warning: damaged run file {d}", file=sys.stderr)
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
