"""Prints the markdown tables of docs/results.md from the JSON results of benchmarks/imagewoof-results.sh (the
short CPU recipe, the default OUT) or benchmarks/paper-recipe.sh (the paper's recipe: adds the best-of column,
the seeds table and DD-Ranking's IOR / HLR table).

Usage: python benchmarks/results_table.py [DIR ...]   (rows in a later directory replace an earlier's)
A DIR holds the JSON results (NAME-ipcN[-seedS].json), and optionally earlier.tsv: rows measured before their
JSON was kept (docs/results/paper-recipe/earlier.tsv), in %, a JSON of the same name replacing its row.

DD-Ranking's terms (its soft-label metric, `compute_metrics`): IOR = acc(set, soft labels) - acc(random subset
of the same size, trained the same way); HLR = acc(full data, hard labels) - acc(set, hard labels). We report
IOR against the stronger random baseline at each IPC, and the hard-label accuracies HLR subtracts from the
full-data figure (the full-data training was not run: it does not fit the CPU machine).
"""

from __future__ import annotations

import json
import math
import re
import statistics
import sys
from pathlib import Path

RANDOM_VIEWS = {
    "nocrop": "random real, whole image (flip only)",
    "rdedviews": "random real, RDED's views",
    "imagenet": "random real, ImageNet views",
}
ROWS = [("rded-stored", "RDED (`pad`)", "stored soft labels"),
        ("rded-hard", "RDED (`pad`)", "hard labels"),
        ("rded-online", "RDED (`pad`)", "observer online (authors' way)"),
        ("native-stored", "RDED (`native` scoring)", "stored soft labels"),
        ("pool320-stored", "RDED (`pad`), full pool at 320 px", "stored soft labels"),
        # the same students validated again on the 320-px val photos (final only: best-of was checked at 160 px)
        ("rded-stored-val320", "RDED (`pad`), val at 320 px", "stored soft labels"),
        ("pool320-stored-val320", "RDED (`pad`), full pool at 320 px, val at 320 px", "stored soft labels"),
        ("refine-stored", "RDED + refine", "stored soft labels"),
        ("refine-data-stored", "RDED + refine, BN term on the data's statistics", "stored soft labels"),
        ("refine-long-stored", "RDED + refine, data's statistics, 1,000 iterations", "stored soft labels"),
        # the short recipe's names for the whole-image baseline
        ("random-soft", RANDOM_VIEWS["nocrop"], "stored soft labels"),
        ("random-hard", RANDOM_VIEWS["nocrop"], "hard labels")]
ROWS += [(f"random-{views}-{labels}", data, "stored soft labels" if labels == "soft" else "hard labels")
         for views, data in RANDOM_VIEWS.items() for labels in ("soft", "hard")]
NAME = re.compile(r"^(?P<stem>.+)-ipc(?P<ipc>\d+)(?:-seed(?P<seed>\d+))?\.json$")


def earlier_rows(path: Path) -> dict[str, dict]:
    """earlier.tsv's rows as results (fractions, as the JSON has them); a field not recorded is left out."""
    lines = [line.split("\t") for line in path.read_text().splitlines() if line and not line.startswith("#")]
    rows = {}
    for values in lines[1:]:
        row = dict(zip(lines[0], values))
        result: dict = {"val_samples": 3929, "measured": row["measured"]}
        for key in ("top1", "top5"):
            if row[key]:
                result[key] = float(row[key]) / 100
        if row["best_of_top1"]:
            result["best_of"] = {"top1": float(row["best_of_top1"]) / 100,
                                 "epoch": int(row["best_of_epoch"]) if row["best_of_epoch"] else None}
        for key in ("train_seconds", "seconds"):
            if row[key]:
                result[key] = float(row[key])
        rows[row["name"] + ".json"] = result
    return rows


def load(dirs: list[Path]) -> dict[tuple[str, int], dict[int, dict]]:
    """(stem, ipc) -> seed -> result, from every directory in order."""
    results: dict[tuple[str, int], dict[int, dict]] = {}
    for d in dirs:
        found = earlier_rows(d / "earlier.tsv") if (d / "earlier.tsv").is_file() else {}
        found |= {path.name: json.loads(path.read_text()) for path in sorted(d.glob("*.json"))}
        for name, result in found.items():
            if m := NAME.match(name):
                results.setdefault((m["stem"], int(m["ipc"])), {})[int(m["seed"] or 0)] = result
    return results


def pct(r: dict, key: str) -> str:
    return f"{100 * r[key]:.1f}" if key in r else ""


def main_table(results: dict) -> list[str]:
    rows = [(ipc, stem, data, labels, results[(stem, ipc)][0]) for ipc in (1, 10, 50)
            for stem, data, labels in ROWS if 0 in results.get((stem, ipc), {})]
    if not rows:
        return ["(no results)"]
    best_of = any("best_of" in r for *_, r in rows)
    columns = ["IPC", "data", "labels"]
    if best_of:  # the paper's-recipe table names the final figure's val sample beside the best-of subset
        columns += [f"final top-1 % ({rows[0][-1]['val_samples']:,} val)", "final top-5 %", "best-of top-1 % (epoch)"]
    else:
        columns += ["top-1 %", "top-5 %"]
    columns += ["train s", "total s"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for ipc, stem, data, labels, r in rows:
        cells = [str(ipc), data, labels, pct(r, "top1"), pct(r, "top5")]
        if best_of:
            # a student validated again at 320 px keeps its training's best-of checks, made at 160 px
            best = r.get("best_of") if not stem.endswith("-val320") else None
            cells.append(f"{100 * best['top1']:.1f} ({best['epoch']})" if best else "")
        cells += [f"{r[k]:.0f}" if k in r else "" for k in ("train_seconds", "seconds")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def top1(r: dict, key: str) -> float | None:
    """Top-1 % of one result: the final figure on every val image, or the best-of."""
    if key == "final":
        return 100 * r["top1"] if "top1" in r else None
    return 100 * r["best_of"]["top1"] if r.get("best_of") else None


def binomial_se(percent: float, n: int) -> float:
    return 100 * math.sqrt(percent / 100 * (1 - percent / 100) / n)


def paired(a: dict[int, dict], b: dict[int, dict], key: str = "final") -> tuple[float, float, float, float, int]:
    """a's and b's top-1 % over the seeds both have, and their difference with its standard error: that of the
    seeds' paired differences (the same seed: the same initialisation and best-of subset), at least the
    binomial error of the evaluations (val sampling); with one seed the binomial error alone, which leaves out
    the training's own noise and so understates the error."""
    seeds = [s for s in sorted(set(a) & set(b)) if top1(a[s], key) is not None and top1(b[s], key) is not None]
    if not seeds:
        return math.nan, math.nan, math.nan, math.nan, 0
    xs, ys = [top1(a[s], key) for s in seeds], [top1(b[s], key) for s in seeds]
    diffs = [x - y for x, y in zip(xs, ys)]
    n = a[seeds[0]].get("val_samples", 3929) if key == "final" else 500
    # the val sample's error is a floor: a few seeds' spread can come out far below it by chance
    se = math.hypot(binomial_se(statistics.fmean(xs), n), binomial_se(statistics.fmean(ys), n)) / math.sqrt(len(seeds))
    if len(seeds) > 1:
        se = max(se, statistics.stdev(diffs) / math.sqrt(len(seeds)))
    return statistics.fmean(xs), statistics.fmean(ys), statistics.fmean(diffs), se, len(seeds)


def ranking_table(results: dict) -> list[str]:
    """IOR of RDED over the stronger random baseline (soft labels), and the hard-label accuracies of HLR."""
    lines = ["| IPC | stronger random baseline (soft) | seeds | RDED, soft | random, soft | IOR, final "
             "| IOR, best-of | IOR > 2 SE | RDED, hard | that random, hard |", "|---" * 10 + "|"]
    for ipc in (1, 10, 50):
        rded = results.get(("rded-stored", ipc))
        randoms = {v: results[(f"random-{v}-soft", ipc)] for v in RANDOM_VIEWS if (f"random-{v}-soft", ipc) in results}
        if not rded or not randoms:
            continue
        views = max(randoms, key=lambda v: statistics.fmean(top1(r, "final") for r in randoms[v].values()))
        a, b, ior, se, n = paired(rded, randoms[views])
        *_, ior_best, se_best, _ = paired(rded, randoms[views], "best")
        hard = [results.get((stem, ipc), {}) for stem in ("rded-hard", f"random-{views}-hard")]
        hard_cells = [(f"{statistics.fmean(top1(r, 'final') for r in runs.values()):.1f} ({len(runs)})" if runs
                       else "not run") for runs in hard]
        lines.append("| " + " | ".join([
            str(ipc), RANDOM_VIEWS[views], str(n), f"{a:.1f}", f"{b:.1f}", f"{ior:+.1f} ± {se:.1f}",
            "" if math.isnan(ior_best) else f"{ior_best:+.1f} ± {se_best:.1f}", "yes" if abs(ior) > 2 * se else "no",
            *hard_cells]) + " |")
    return lines


def seeds_table(results: dict) -> list[str]:
    lines = ["| IPC | data | labels | seeds | final top-1 % (each) | mean ± sd | best-of (each) | mean ± sd |",
             "|---" * 8 + "|"]
    for ipc in (1, 10, 50):
        for stem, data, labels in ROWS:
            runs = results.get((stem, ipc), {})
            if len(runs) < 2:
                continue
            final = [100 * runs[s]["top1"] for s in sorted(runs)]
            best = [100 * runs[s]["best_of"]["top1"] for s in sorted(runs) if runs[s].get("best_of")]
            sd = lambda v: f"{statistics.fmean(v):.1f} ± {statistics.stdev(v):.1f}" if len(v) > 1 else ""  # noqa: E731
            lines.append(f"| {ipc} | {data} | {labels} | {', '.join(map(str, sorted(runs)))} | "
                         f"{', '.join(f'{v:.1f}' for v in final)} | {sd(final)} | "
                         f"{', '.join(f'{v:.1f}' for v in best)} | {sd(best)} |")
    return lines if len(lines) > 2 else []


def main(dirs: list[Path]) -> None:
    results = load(dirs)
    print("\n".join(main_table(results)))
    if seeds := seeds_table(results):
        print("\nSeeds:\n")
        print("\n".join(seeds))
    if len(ranking := ranking_table(results)) > 2:  # rows beyond the header: a random baseline and RDED
        print("\nIOR and the hard-label accuracies of HLR (DD-Ranking's terms; ± one standard error; hard: "
              "mean final top-1 % (seeds)):\n")
        print("\n".join(ranking))


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]] or [Path("out/imagewoof-results")])
