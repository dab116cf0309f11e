"""Prints the markdown tables of docs/results.md from the JSON results of benchmarks/imagewoof-results.sh (the
short CPU recipe, the default OUT) or benchmarks/paper-recipe.sh (the paper's recipe: adds the best-of column,
the seeds table and DD-Ranking's IOR / HLR table).

Usage: python benchmarks/results_table.py [OUT_DIR ...]   (rows in a later directory replace an earlier's)

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
        ("refine-stored", "RDED + refine", "stored soft labels"),
        # the short recipe's names for the whole-image baseline
        ("random-soft", RANDOM_VIEWS["nocrop"], "stored soft labels"),
        ("random-hard", RANDOM_VIEWS["nocrop"], "hard labels")]
ROWS += [(f"random-{views}-{labels}", data, "stored soft labels" if labels == "soft" else "hard labels")
         for views, data in RANDOM_VIEWS.items() for labels in ("soft", "hard")]
NAME = re.compile(r"^(?P<stem>.+)-ipc(?P<ipc>\d+)(?:-seed(?P<seed>\d+))?\.json$")


def load(dirs: list[Path]) -> dict[tuple[str, int], dict[int, dict]]:
    """(stem, ipc) -> seed -> result, from every directory in order."""
    results: dict[tuple[str, int], dict[int, dict]] = {}
    for d in dirs:
        for path in sorted(d.glob("*.json")):
            if m := NAME.match(path.name):
                results.setdefault((m["stem"], int(m["ipc"])), {})[int(m["seed"] or 0)] = json.loads(path.read_text())
    return results


def main_table(results: dict) -> list[str]:
    rows = [(ipc, data, labels, results[(stem, ipc)][0]) for ipc in (1, 10, 50) for stem, data, labels in ROWS
            if 0 in results.get((stem, ipc), {})]
    if not rows:
        return ["(no results)"]
    best_of = any("best_of" in r for *_, r in rows)
    columns = ["IPC", "data", "labels"]
    if best_of:  # the paper's-recipe table names the final figure's val sample beside the best-of subset
        columns += [f"final top-1 % ({rows[0][3]['val_samples']:,} val)", "final top-5 %", "best-of top-1 % (epoch)"]
    else:
        columns += ["top-1 %", "top-5 %"]
    columns += ["train s", "total s"]
    lines = ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
    for ipc, data, labels, r in rows:
        cells = [str(ipc), data, labels, f"{100 * r['top1']:.1f}", f"{100 * r['top5']:.1f}"]
        if best_of:
            best = r.get("best_of")
            cells.append(f"{100 * best['top1']:.1f} ({best['epoch']})" if best else "")
        cells += [f"{r['train_seconds']:.0f}", f"{r['seconds']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def estimate(runs: dict[int, dict], key: str = "final") -> tuple[float, float, int]:
    """Top-1 % (mean over seeds) and its standard error: over seeds when there are several, else the
    binomial error of the one evaluation (val sampling only: it leaves out the training's own noise)."""
    values = [100 * (r["top1"] if key == "final" else r["best_of"]["top1"]) for r in runs.values()
              if key == "final" or r.get("best_of")]
    if not values:
        return math.nan, math.nan, 0
    mean = statistics.fmean(values)
    if len(values) > 1:
        return mean, statistics.stdev(values) / math.sqrt(len(values)), len(values)
    n = next(iter(runs.values()))["val_samples"] if key == "final" else 500
    return mean, 100 * math.sqrt(mean / 100 * (1 - mean / 100) / n), 1


def ranking_table(results: dict) -> list[str]:
    """IOR of RDED over the stronger random baseline (soft labels), and the hard-label accuracies of HLR."""
    lines = ["| IPC | RDED, soft | stronger random, soft | IOR (final) | IOR (best-of) | > 2 SE | RDED, hard "
             "| that random, hard | HLR |", "|---" * 9 + "|"]
    for ipc in (1, 10, 50):
        rded = results.get(("rded-stored", ipc))
        randoms = {v: results[(f"random-{v}-soft", ipc)] for v in RANDOM_VIEWS if (f"random-{v}-soft", ipc) in results}
        if not rded or not randoms:
            continue
        views = max(randoms, key=lambda v: estimate(randoms[v])[0])
        (a, sa, na), (b, sb, nb) = estimate(rded), estimate(randoms[views])
        ior, se = a - b, math.hypot(sa, sb)
        (ab, sab, _), (bb, sbb, _) = estimate(rded, "best"), estimate(randoms[views], "best")
        hard = results.get(("rded-hard", ipc))
        rhard = results.get((f"random-{views}-hard", ipc))
        fmt = lambda x, s, n: f"{x:.1f} ± {s:.1f} ({n} seed{'s' if n > 1 else ''})"  # noqa: E731
        lines.append("| " + " | ".join([
            str(ipc), fmt(a, sa, na), f"{RANDOM_VIEWS[views]}: {fmt(b, sb, nb)}", f"{ior:+.1f} ± {se:.1f}",
            f"{ab - bb:+.1f} ± {math.hypot(sab, sbb):.1f}" if not math.isnan(ab - bb) else "",
            "yes" if abs(ior) > 2 * se else "no",
            fmt(*estimate(hard)) if hard else "not run", fmt(*estimate(rhard)) if rhard else "not run",
            "full − RDED hard (full data not run)"]) + " |")
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
    if any(stem.startswith("random-") and stem.count("-") == 2 for stem, _ in results):
        print("\nIOR / HLR (DD-Ranking's terms; ± one standard error):\n")
        print("\n".join(ranking_table(results)))


if __name__ == "__main__":
    main([Path(a) for a in sys.argv[1:]] or [Path("out/imagewoof-results")])
