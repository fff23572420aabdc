"""The report's figures, its Markdown table and its HTML page.

Each figure is drawn once and saved twice: as a PNG (short labels, for files and MLflow) and
as inline SVG whose points carry ``<title>`` tooltips (for the HTML page, which must work
offline, so no plotting library runs in the browser).

A point is drawn as its own artist with a ``gid``; the SVG is then parsed and each such
group gets a ``<title>`` child, which browsers show on hover.
"""

from __future__ import annotations

import html
import io
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

plt.rcParams["svg.fonttype"] = "none"  # the page's charts keep their text as text: searchable, crisp at any width

from tokprune.search.plan import param_strings  # noqa: E402
from tokprune.search.results import distinct_baselines  # noqa: E402

SVG_NS = "http://www.w3.org/2000/svg"
ET.register_namespace("", SVG_NS)
ET.register_namespace("xlink", "http://www.w3.org/1999/xlink")

CONVENTION = "fvcore: 1 multiply-add = 1 FLOP"
X_REAL = f"FLOPs ratio vs unpruned, same examples at real length ({CONVENTION})"
BASELINE_COLOR = "black"
PALETTE = plt.get_cmap("tab10").colors


def color(index: int):
    return PALETTE[index % len(PALETTE)]


def varying(points) -> list[str]:
    """The parameters whose value differs between the trials (a space's fixed settings, one-choice
    categoricals, tell no trial apart), in the space's order."""
    keys = list(dict.fromkeys(k for p in points for k in p.params))
    return [k for k in keys if len({repr(p.params.get(k)) for p in points}) > 1]


def short_label(point, keys: list[str] | None = None) -> str:
    """``t3`` plus the first of ``keys`` (the study's varying parameters; default: the trial's first):
    fits beside a point in a PNG; the hover text has them all."""
    label = f"t{point.trial}"
    keys = list(point.params)[:1] if keys is None else keys[:1]
    for key in keys:
        value = point.params.get(key)
        name = key.rsplit(".", 1)[-1]
        label += f" {name}={value:.3g}" if isinstance(value, float) else f" {name}={value}"
    return label


def _save(fig, png: Path, tips: dict[str, str]) -> str:
    """Write the PNG, return the SVG text with a ``<title>`` on every tipped point."""
    fig.savefig(png, dpi=110, bbox_inches="tight")  # the legend sits outside the axes
    buffer = io.StringIO()
    fig.savefig(buffer, format="svg", bbox_inches="tight")
    plt.close(fig)
    root = ET.fromstring(buffer.getvalue())
    for meta in root.findall(f"{{{SVG_NS}}}metadata"):  # RDF with the creator's URL: no URLs in the page
        root.remove(meta)
    for element in root.iter():
        tip = tips.get(element.get("id", ""))
        if tip is not None:
            title = ET.Element(f"{{{SVG_NS}}}title")
            title.text = tip
            element.insert(0, title)
    root.set("style", "max-width:100%;height:auto")
    return ET.tostring(root, encoding="unicode")


def _baseline(ax, base: dict, metric: str, tips: dict, gid: str, label: str = "unpruned baseline (method=none)"):
    if not base or not math.isfinite(base.get("metric", math.nan)):
        return
    ax.plot(
        [1.0],
        [base["metric"]],
        marker="*",
        markersize=14,
        color=BASELINE_COLOR,
        linestyle="none",
        label=label,
        gid=gid,
        zorder=5,
    )
    tips[gid] = (
        f"unpruned baseline (method=none), run {base['run_id']}\n{metric}={base['metric']:.4f}\n"
        f"FLOPs ratio real=1.000, padded={base.get('flops_padded', math.nan):.3f}"
    )


def _front_line(ax, front, col, label=None):
    """The front as a staircase: at a FLOPs budget x, the best metric reached at or below x."""
    if front:
        xs = [p.flops_real for p in front]
        ys = [p.metric for p in front]
        ax.plot(xs, ys, drawstyle="steps-post", color=col, alpha=0.7, linewidth=1.5, label=label)


def _seed_spread(ax, p, col) -> None:
    """A repeated trial (``make repeat``): its mean over seeds +- the standard deviation, beside the point."""
    if p.repeats:
        ax.errorbar(
            [p.flops_real],
            [p.metric_mean],
            yerr=[p.metric_std],
            color=col,
            capsize=4,
            elinewidth=1.2,
            marker="_",
            markersize=10,
            zorder=5,
        )


def method_front(result, task: str, metric: str, max_length: int, index: int, png: Path) -> str:
    """One method: every complete trial (dominated ones faded), the front, the baseline."""
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    col, tips = color(index), {}
    front = result.front
    _front_line(ax, front, col, "Pareto front (staircase: the best reached at or below each FLOPs ratio)")
    faded = dict(alpha=0.25, markersize=6)
    for n, p in enumerate(sorted(result.points, key=lambda p: p.trial)):
        gid = f"pt-{result.slug}-{n}"
        style = dict(markersize=8) if p.pareto else faded
        ax.plot([p.flops_real], [p.metric], marker="o", color=col, linestyle="none", gid=gid, zorder=4, **style)
        _seed_spread(ax, p, col)
        tips[gid] = tooltip(result.method, p, metric, max_length)
    keys = varying(result.points)
    for n, ((x, y), labels) in enumerate(_coincident(front, keys).items()):  # one label per spot
        # labels take turns above and below their point, with a leader line, so neighbours do not overlap
        offset = (6, 10 + 8 * (n % 3)) if n % 2 == 0 else (6, -14 - 8 * (n % 3))
        ax.annotate(
            ", ".join(labels),
            (x, y),
            textcoords="offset points",
            xytext=offset,
            fontsize=7,
            color=col,
            arrowprops=dict(arrowstyle="-", color=col, alpha=0.5, linewidth=0.6),
            annotation_clip=False,
        )
    if any(not p.pareto for p in result.points):
        ax.plot([], [], marker="o", color=col, linestyle="none", label="dominated trials (faded)", **faded)
    _baseline(ax, result.baseline, metric, tips, f"base-{result.slug}")
    ax.set_xlabel(X_REAL, fontsize=8)
    ax.set_ylabel(f"dev {metric} (selected validation)")
    ax.set_title(
        f"{task} · {result.label}: dev {metric} vs FLOPs ratio at real length\n"
        f"{len(result.points)} complete trials, {len(front)} Pareto-optimal; {CONVENTION}",
        fontsize=9,
    )
    _finish(ax)
    fig.tight_layout()
    return _save(fig, png, tips)


def overlay(results, task: str, metric: str, max_length: int, png: Path) -> str:
    """All methods of the task on one chart: fronts (dominated trials faint) and the baseline(s)."""
    fig, ax = plt.subplots(figsize=(8.5, 5.2))
    tips: dict[str, str] = {}
    for index, result in enumerate(results):
        col = color(index)
        _front_line(ax, result.front, col, f"{result.label} front (staircase)")
        for n, p in enumerate(result.points):
            gid = f"all-{result.slug}-{n}"
            ax.plot(
                [p.flops_real],
                [p.metric],
                marker="o",
                color=col,
                linestyle="none",
                gid=gid,
                zorder=4,
                **(dict(markersize=7) if p.pareto else dict(markersize=4, alpha=0.2)),
            )
            _seed_spread(ax, p, col)
            tips[gid] = tooltip(result.method, p, metric, max_length)
    for n, (base, _runs) in enumerate(distinct_baselines(results)):
        label = "unpruned baseline (method=none)" + (f" [{n + 1}]" if n else "")
        _baseline(ax, base, metric, tips, f"base-all-{n + 1}", label)
    ax.set_xlabel(X_REAL, fontsize=8)
    ax.set_ylabel(f"dev {metric} (selected validation)")
    ax.set_title(f"{task}: all methods, dev {metric} vs FLOPs ratio at real length ({CONVENTION})", fontsize=9)
    _finish(ax)
    fig.tight_layout()
    return _save(fig, png, tips)


def kept_profile(result, task: str, metric: str, max_length: int, index: int, png: Path) -> str:
    """Kept fraction of real tokens per layer (mean over dev examples) of each Pareto-optimal trial."""
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    tips: dict[str, str] = {}
    front = [p for p in result.front if p.kept]
    keys = varying(result.points)
    cmap = plt.get_cmap("viridis")
    for n, p in enumerate(front):
        col = cmap(n / max(1, len(front) - 1) * 0.85)
        gid = f"kept-{result.slug}-{n}"
        ax.plot(range(len(p.kept)), p.kept, marker="o", color=col, label=short_label(p, keys), gid=gid)
        tips[gid] = (
            tooltip(result.method, p, metric, max_length) + "\nkept per layer: " + " ".join(f"{k:.2f}" for k in p.kept)
        )
    if front:
        layers = max(len(p.kept) for p in front)
        ax.plot(range(layers), [1.0] * layers, linestyle="--", color=BASELINE_COLOR, label="unpruned (all kept)")
        ax.set_xticks(range(layers))
    else:
        ax.text(0.5, 0.5, "no Pareto-optimal trial with per-layer data", ha="center", transform=ax.transAxes)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction of real tokens computed\n(mean over dev examples)")
    ax.set_title(
        f"{task} · {result.label}: tokens kept per layer, Pareto-optimal trials (dev, selected validation)", fontsize=9
    )
    _finish(ax)
    fig.tight_layout()
    return _save(fig, png, tips)


def tooltip(method: str, p, metric: str, max_length: int) -> str:
    lines = [f"{method} trial {p.trial}" + (" (Pareto-optimal)" if p.pareto else " (dominated)")]
    lines += param_strings(p.params)
    lines.append(f"{metric}={p.metric:.4f}")
    padded = f"{p.flops_padded:.3f}" if p.flops_padded is not None else "n/a"
    lines.append(f"FLOPs ratio real={p.flops_real:.3f}, padded to {max_length}={padded}")
    return "\n".join(lines)


def _coincident(points, keys: list[str] | None = None) -> dict[tuple[float, float], list[str]]:
    spots: dict[tuple[float, float], list[str]] = {}
    for p in points:
        spots.setdefault((p.flops_real, p.metric), []).append(short_label(p, keys))
    return spots


def _finish(ax):
    ax.grid(True, alpha=0.3)
    handles, _ = ax.get_legend_handles_labels()
    if handles:  # outside the axes, on the right: a legend never covers a point or a profile
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


# -- the table and the page ------------------------------------------------------------------


def markdown(title: str, note: str, tables: list[tuple[str, list[str], list[list[str]]]]) -> str:
    lines = [f"# {title}", "", note]
    for heading, head, rows in tables:
        lines += ["", f"## {heading}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em auto; max-width: 1600px; color: #222; }}
svg {{ width: 100%; height: auto; }}
table {{ border-collapse: collapse; font-size: 0.85em; }} td, th {{ border: 1px solid #ccc; padding: 3px 6px; }}
th {{ background: #f0f0f0; }} .note {{ color: #555; font-size: 0.9em; }} figure {{ margin: 0.5em 0; }}
</style></head><body>
<h1>{title}</h1>
<p class="note">{meta}</p>
<p class="note">{note} Hover a point for its trial's parameters.</p>
<h2>All methods</h2>
<figure>{overlay}</figure>
{tables}
{sections}
</body></html>
"""


def page(title: str, meta: str, note: str, tables, overlay_svg: str, sections: list[tuple[str, str, str]]) -> str:
    parts = []
    for heading, head, rows in tables:
        cells = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
        parts.append(f"<h2>{html.escape(heading)}</h2><table><tr>{cells}</tr>{body}</table>")
    figures = "".join(
        f"<h2>{html.escape(label)}</h2><figure>{front}</figure><figure>{kept}</figure>"
        for label, front, kept in sections
    )
    return PAGE.format(
        title=html.escape(title),
        meta=html.escape(meta),
        note=html.escape(note),
        overlay=overlay_svg,
        tables="".join(parts),
        sections=figures,
    )
