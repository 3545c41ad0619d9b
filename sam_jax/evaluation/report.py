"""Reports of an evaluation run: results.json, a Markdown and a CSV table, an mIoU-vs-points plot
(points task), a per-group table (groups.csv, with --group-by).

`results` layout (what evaluate_checkpoint builds, metrics as fractions):
  {"checkpoint": str, "seed": int, "protocol": {"task", ...},
   "datasets": {name: {"num_images", "num_masks", "miou": {"1": f, ...}, "oracle_miou_1",
                       "box_miou", "mask_ap": {"AP", ...} | None, "skipped_images",
                       "skipped_masks", "timing": {...}, "groups": {...}, "paper": {...} | None,
                       ...}},     # points / boxes; "edges", "proposals" or "mask_ap" otherwise
   "average": {...}}   # filled by `add_average`
The table's columns follow the task (`METRIC_TABLES` for instances, edges and proposals); where a
dataset is the paper's, a "paper" row with the paper's numbers follows its row. Tables show
percentages with one decimal; a metric a dataset lacks is shown as "-" (Markdown) or left empty
(CSV), never as 0. The output folder may be local or a URL (gs://bucket/...): files are written
whole through `sam_jax.paths`.
"""

from __future__ import annotations

import csv
import io
import json
import math

import numpy as np

from sam_jax import paths
from sam_jax.evaluation.figures import save_prediction_figure
from sam_jax.evaluation.metrics import dataset_average


def _ap(d: dict) -> float | None:
    """Mask AP of a dataset entry ({"AP": ...}) or of the average entry (a float)."""
    ap = d.get("mask_ap")
    return ap.get("AP") if isinstance(ap, dict) else ap


def add_average(results: dict) -> dict:
    """Adds results["average"]: the mean over datasets of each per-dataset metric."""
    datasets = list(results["datasets"].values())
    points = sorted({int(n) for d in datasets for n in (d.get("miou") or {})})
    results["average"] = {
        "num_datasets": len(datasets),
        "miou": {
            str(n): dataset_average([(d.get("miou") or {}).get(str(n)) for d in datasets])
            for n in points
        },
        "oracle_miou_1": dataset_average([d.get("oracle_miou_1") for d in datasets]),
        "box_miou": dataset_average([d.get("box_miou") for d in datasets]),
        "mask_ap": dataset_average([_ap(d) for d in datasets]),
    }
    return results


def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items() if k != "per_mask"}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, np.generic):
        x = x.item()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(results: dict, path: str) -> None:
    paths.write_text(path, json.dumps(_json_safe(results), indent=2, sort_keys=False) + "\n")


# task -> (the entry's metrics dict, column prefix, its metric names in column order)
METRIC_TABLES = {
    "instances": (
        "mask_ap",
        "mask ",
        ("AP", "AP50", "AP75", "APs", "APm", "APl", "APr", "APc", "APf"),
    ),
    "edges": ("edges", "", ("ODS", "OIS", "AP", "R50")),
    "proposals": ("proposals", "mask ", ("AR", "ARs", "ARm", "ARl", "ARf", "ARc", "ARr")),
    "text": ("text_miou", "mIoU ", ("text", "text_oracle", "point", "text+point", "region")),
}
PAPER_ROW = "paper (SAM ViT-H)"


def _task(results: dict) -> str:
    return (results.get("protocol") or {}).get("task", "points")


def _pct(v):
    return None if v is None else 100.0 * float(v)


def _metric_rows(results: dict, task: str):
    key, prefix, names = METRIC_TABLES[task]
    rows = []
    for name, d in results["datasets"].items():
        rows.append((name, d.get("num_images"), d.get(key) or {}))
        if d.get("paper"):
            rows.append((PAPER_ROW, None, d["paper"]))
    names = [n for n in names if any(m.get(n) is not None for _, _, m in rows)]
    header = ["dataset", "images", *(prefix + n for n in names)]
    return header, [[r[0], r[1], *(_pct(r[2].get(n)) for n in names)] for r in rows]


def _columns(results: dict) -> tuple[list[int], list[str]]:
    rows = [*results["datasets"].values(), results.get("average", {})]
    points = sorted({int(n) for d in rows for n in (d.get("miou") or {})})
    extra = [
        name
        for name, get in (
            ("oracle 1pt", lambda d: d.get("oracle_miou_1")),
            ("box", lambda d: d.get("box_miou")),
            ("mask AP", _ap),
        )
        if any(get(d) is not None for d in rows)
    ]
    return points, extra


def table_rows(results: dict) -> tuple[list[str], list[list[float | int | str | None]]]:
    """Header and rows (per dataset, then the average or the paper's numbers), metrics in
    percent; None = not measured."""
    if _task(results) in METRIC_TABLES:
        return _metric_rows(results, _task(results))
    points, extra = _columns(results)
    header = ["dataset", "images", "masks", *[f"mIoU {n}pt" for n in points], *extra]

    def pct(v):
        return None if v is None else 100.0 * float(v)

    def row(name, d, images, masks):
        miou = d.get("miou") or {}
        values = {
            "oracle 1pt": d.get("oracle_miou_1"),
            "box": d.get("box_miou"),
            "mask AP": _ap(d),
        }
        return [name, images, masks, *[pct(miou.get(str(n))) for n in points]] + [
            pct(values[e]) for e in extra
        ]

    rows = [
        row(name, d, d.get("num_images"), d.get("num_masks"))
        for name, d in results["datasets"].items()
    ]
    if "average" in results:
        n = results["average"]["num_datasets"]
        rows.append(row(f"average ({n} datasets)", results["average"], None, None))
    return header, rows


def _fmt(v) -> str:
    if v is None:
        return ""
    return f"{v:.1f}" if isinstance(v, float) else str(v)


def markdown_table(results: dict) -> str:
    """The results table, then the paper rows' sources and the per-group tables."""
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(v) or "-" for v in r) + " |" for r in rows]
    sources = sorted({d["paper"]["source"] for d in results["datasets"].values() if d.get("paper")})
    if sources and _task(results) in METRIC_TABLES:
        lines += ["", *(f"{PAPER_ROW}: {s}" for s in sources)]
    for name, d in results["datasets"].items():
        if d.get("groups"):
            lines += ["", *_groups_markdown(name, d["groups"])]
    return "\n".join(lines) + "\n"


def comparison_markdown(runs: dict[str, dict]) -> str:
    """One table of several runs on the same data ({label: results}, e.g. before and after
    fine-tuning): each dataset's rows, one per run, with a "model" column first."""
    header, lines = None, []
    for label, results in runs.items():
        h, rows = table_rows(results)
        if header is None:
            header = ["model", *h]
            lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join([label, *(_fmt(v) or "-" for v in r)]) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def write_comparison(
    runs: dict[str, dict], output_dir: str, predictors: dict | None = None, examples=None
) -> dict[str, str]:
    """The reports of two runs on the same data ({"before": results, "after": results}): the
    last run's in output_dir, the first's in output_dir/baseline, both side by side in
    comparison.md and, given their predictors and a few examples, before_after.png (their
    predictions after 1 and 5 clicks). Returns {kind: path} of the files written."""
    (first, base), (_, last) = list(runs.items())[0], list(runs.items())[-1]
    written = write_reports(last, output_dir)
    base_written = write_reports(base, paths.join(output_dir, "baseline"))
    written.update({f"{first} {k}": v for k, v in base_written.items()})
    written["comparison"] = paths.join(output_dir, "comparison.md")
    paths.write_text(written["comparison"], comparison_markdown(runs))
    if predictors and examples:
        written["figure"] = save_prediction_figure(
            list(predictors.items()),
            examples,
            paths.join(output_dir, "before_after.png"),
            num_images=len(examples),
        )
    return written


def group_rows(results: dict) -> list[list]:
    """Rows (dataset, field, group, masks, points, mIoU, CI low, CI high) of every dataset's
    groups, metrics in percent."""
    rows = []
    for name, d in results["datasets"].items():
        g = d.get("groups")
        if not g:
            continue
        for value, e in g["groups"].items():
            for n, m in e["miou"].items():
                lo, hi = e["ci"][n]
                rows.append(
                    [name, g["field"], value, e["num_masks"], int(n), _pct(m), _pct(lo), _pct(hi)]
                )
    return rows


def _groups_markdown(name: str, g: dict) -> list[str]:
    points = sorted({int(n) for e in g["groups"].values() for n in e["miou"]})
    header = ["group", "masks", *(f"mIoU {n}pt [CI]" for n in points)]
    lines = [
        f"{name}: mIoU by {g['field']}"
        + (f" in bins {g['bins']['bins']}" if g.get("bins") else "")
        + f" ({g['interval']})",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for value, e in g["groups"].items():
        cells = [
            f"{_fmt(_pct(e['miou'][str(n)]))} [{_fmt(_pct(e['ci'][str(n)][0]))}, "
            f"{_fmt(_pct(e['ci'][str(n)][1]))}]"
            for n in points
        ]
        lines.append("| " + " | ".join([value, str(e["num_masks"]), *cells]) + " |")
    return lines


def groups_csv(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["dataset", "field", "group", "masks", "points", "miou", "ci_low", "ci_high"])
    writer.writerows([[_fmt(v) for v in r] for r in group_rows(results)])
    return buf.getvalue()


def csv_table(results: dict) -> str:
    header, rows = table_rows(results)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    writer.writerows([[_fmt(v) for v in r] for r in rows])
    return buf.getvalue()


def plot_miou(results: dict, path: str) -> bool:
    """PNG plot of mIoU (%) against the number of points, one line per dataset (+ average).
    Returns False (and writes nothing) when no dataset has point results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = {name: d["miou"] for name, d in results["datasets"].items() if d.get("miou")}
    if not series:
        return False
    if len(series) > 1 and (results.get("average") or {}).get("miou"):
        series["average"] = results["average"]["miou"]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, miou in series.items():
        pts = sorted((int(n), 100.0 * v) for n, v in miou.items() if v is not None)
        style = "--" if name == "average" else "-"
        ax.plot(*zip(*pts, strict=True), style, marker="o", label=name)
    ax.set_xticks(sorted({int(n) for miou in series.values() for n in miou}))
    ax.set_ylim(0, 100)
    ax.set_xlabel("number of points")
    ax.set_ylabel("mIoU (%)")
    ax.set_title("Point-prompt mIoU")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    paths.write_bytes(path, buf.getvalue())
    return True


def write_reports(results: dict, output_dir: str) -> dict[str, str]:
    """Writes results.json, results.md, results.csv, miou_vs_points.png (points results) and
    groups.csv (grouped results) under output_dir. Returns {kind: path} of the files written."""
    paths.makedirs(output_dir)
    if "average" not in results:
        add_average(results)
    written = {
        k: paths.join(output_dir, f)
        for k, f in (
            ("json", "results.json"),
            ("markdown", "results.md"),
            ("csv", "results.csv"),
            ("plot", "miou_vs_points.png"),
        )
    }
    write_json(results, written["json"])
    paths.write_text(written["markdown"], markdown_table(results))
    paths.write_text(written["csv"], csv_table(results))
    if not plot_miou(results, written["plot"]):
        del written["plot"]
    if group_rows(results):
        written["groups"] = paths.join(output_dir, "groups.csv")
        paths.write_text(written["groups"], groups_csv(results))
    return written
