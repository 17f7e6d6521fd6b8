"""report.html: a self-contained view of report.json for a person deciding what to drop.

Generated from the report dict alone (report.json is the machine-readable
twin); no network assets: plots are inline SVG, styles inline, and URLs from
the data are shown as text without their scheme, so opening the file fetches
nothing. Every number shown from report.json carries ``data-key`` with its
dotted path, so a test (or a reader) can check it against the JSON.
"""

from __future__ import annotations

import html
import math
from typing import Any

_STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:2em;border-bottom:1px solid #ccc}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ddd;padding:.25em .6em;text-align:right}
th{background:#f4f4f4}td.text{text-align:left;max-width:420px;overflow-wrap:anywhere}
.ok{color:#080;font-weight:bold}.bad{color:#b00;font-weight:bold}svg{background:#fafafa;border:1px solid #eee}
"""


def _get(report: dict, key: str) -> Any:
    value: Any = report
    for part in key.split("."):
        if isinstance(value, list):
            value = value[int(part)]
        elif isinstance(value, dict) and part in value:
            value = value[part]
        else:
            return None
    return value


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "–"
    return html.escape(str(value))


def _cell(report: dict, key: str) -> str:
    return f'<td data-key="{key}">{_fmt(_get(report, key))}</td>'


def _rows(report: dict, items: list[tuple[str, str]]) -> str:
    body = "".join(f"<tr><th>{html.escape(label)}</th>{_cell(report, key)}</tr>" for label, key in items
                   if _get(report, key) is not None)
    return f"<table>{body}</table>"


def _text(value: Any) -> str:
    """Metadata text; URLs lose their scheme so nothing in the file points to the network."""
    text = "" if value is None else str(value)
    for scheme in ("https://", "http://"):
        if text.lower().startswith(scheme):
            text = text[len(scheme):]
    return html.escape(text[:300])


def bar_chart(labels: list[str], values: list[float], title: str, log_y: bool = False, width: int = 720,
              height: int = 220) -> str:
    """Vertical bars as inline SVG."""
    if not values:
        return f"<p>{html.escape(title)}: no data</p>"
    scale = [math.log10(v + 1) if log_y else float(v) for v in values]
    top = max(scale) or 1.0
    left, bottom, inner_w, inner_h = 50, 40, width - 60, height - 60
    step = inner_w / len(values)
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for index, (label, value, scaled) in enumerate(zip(labels, values, scale, strict=True)):
        bar_h = inner_h * scaled / top
        x = left + index * step
        parts.append(f'<rect x="{x:.1f}" y="{height - bottom - bar_h:.1f}" width="{max(1.0, step - 1):.1f}" '
                     f'height="{bar_h:.1f}" fill="#4a78b5"><title>{html.escape(label)}: {_fmt(value)}</title></rect>')
    ticks = sorted({0, len(labels) // 2, len(labels) - 1})
    for index in ticks:
        parts.append(f'<text x="{left + (index + 0.5) * step:.1f}" y="{height - bottom + 14}" font-size="10" '
                     f'text-anchor="middle">{html.escape(labels[index])}</text>')
    parts.append(f'<text x="12" y="{height / 2}" font-size="10" transform="rotate(-90 12 {height / 2})" '
                 f'text-anchor="middle">{"count (log)" if log_y else "count"}</text>')
    parts.append(f'<text x="{left - 4}" y="{height - bottom - inner_h + 4}" font-size="10" text-anchor="end">'
                 f'{_fmt(max(values))}</text></svg>')
    return "".join(parts)


def loglog_chart(points: list[tuple[float, float]], title: str, x_label: str, y_label: str, width: int = 720,
                 height: int = 260) -> str:
    """A log-log scatter as inline SVG."""
    points = [(x, y) for x, y in points if x > 0 and y > 0]
    if not points:
        return f"<p>{html.escape(title)}: no data</p>"
    xs, ys = [math.log10(x) for x, _ in points], [math.log10(y) for _, y in points]
    x_lo, x_hi, y_lo, y_hi = min(xs), max(xs) or 1.0, 0.0, max(ys) or 1.0
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    left, bottom, inner_w, inner_h = 55, 40, width - 75, height - 65
    parts = [f'<svg width="{width}" height="{height}" role="img" aria-label="{html.escape(title)}">',
             f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>']
    for (x, y), lx, ly in zip(points, xs, ys, strict=True):
        cx = left + inner_w * (lx - x_lo) / (x_hi - x_lo)
        cy = height - bottom - inner_h * (ly - y_lo) / (y_hi - y_lo or 1.0)
        parts.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="3" fill="#b5544a"><title>{_fmt(x)}: {_fmt(y)}</title>'
                     '</circle>')
    for decade in range(math.floor(x_lo), math.ceil(x_hi) + 1):
        cx = left + inner_w * (decade - x_lo) / (x_hi - x_lo)
        if left - 1 <= cx <= left + inner_w + 1:
            parts.append(f'<text x="{cx:.1f}" y="{height - bottom + 14}" font-size="10" text-anchor="middle">'
                         f'{10 ** decade:,}</text>')
    for decade in range(0, math.ceil(y_hi) + 1):
        cy = height - bottom - inner_h * decade / (y_hi or 1.0)
        parts.append(f'<text x="{left - 4}" y="{cy + 3:.1f}" font-size="10" text-anchor="end">{10 ** decade:,}</text>')
    parts.append(f'<text x="{left + inner_w / 2}" y="{height - 6}" font-size="11" text-anchor="middle">'
                 f'{html.escape(x_label)}</text>')
    parts.append(f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})" '
                 f'text-anchor="middle">{html.escape(y_label)}</text></svg>')
    return "".join(parts)


def render(report: dict) -> str:
    """The whole page, from report.json's content."""
    balanced = _get(report, "accounting.balanced")
    sections = [f"<h1>dedup-spark report</h1><p>input <code>{_text(_get(report, 'input.uri'))}</code> "
                f"({_fmt(_get(report, 'input.format'))}, d={_fmt(_get(report, 'input.dim'))}), "
                f"threshold <span data-key=\"threshold\">{_fmt(report.get('threshold'))}</span></p>"]
    sections.append("<h2>Summary and accounting</h2>" + _rows(report, [
        ("input rows", "accounting.input_rows"), ("kept rows", "accounting.kept_rows"),
        ("removed as duplicates", "accounting.removed_rows"), ("rejected", "accounting.rejected_rows"),
        ("rows in dedup/", "accounting.written_rows"), ("duplicate groups", "groups.count"),
        ("rows in groups", "groups.rows_in_groups"), ("pairs found", "search.pairs_found"),
        ("pairs found is a lower bound (dense groups searched by representatives)", "search.pairs_found_is_lower_bound"),
        ("rows attached to a representative", "search.rows_attached"),
        ("similarities computed", "search.comparisons_done"),
        ("similarities all pairs would cost", "search.comparisons_all_pairs")]))
    sections.append(f'<p>Accounting (input = kept + removed + rejected): '
                    f'<span class="{"ok" if balanced else "bad"}" data-key="accounting.balanced">{_fmt(balanced)}</span></p>')
    rejected = report.get("rejected_by_reason") or {}
    if rejected:
        sections.append("<table><tr><th>reject reason</th><th>rows</th></tr>" + "".join(
            f"<tr><td class=text>{html.escape(reason)}</td>{_cell(report, 'rejected_by_reason.' + reason)}</tr>"
            for reason in sorted(rejected)) + "</table>")
    estimate = report.get("recall_estimate") or {}
    if estimate.get("skipped"):
        sections.append("<h2>Recall estimate</h2><p>off (estimate.sample_rows: 0)</p>")
    elif estimate:
        sections.append("<h2>Recall estimate</h2><p>A uniform sample of rows was compared with every row; "
                        "closure recall is the share of their true pairs whose rows ended in one group.</p>" + _rows(
                            report, [("sampled rows", "recall_estimate.sample_rows"),
                                     ("true pairs seen", "recall_estimate.true_pairs_seen"),
                                     ("closure recall", "recall_estimate.closure_recall"),
                                     ("95% interval, low", "recall_estimate.closure_recall_ci95.0"),
                                     ("95% interval, high", "recall_estimate.closure_recall_ci95.1"),
                                     ("direct recall", "recall_estimate.direct_recall"),
                                     ("cost, seconds", "recall_estimate.seconds"),
                                     ("cost, share of the run", "recall_estimate.fraction_of_run")]))
    if report.get("captions"):
        sections.append("<h2>Captions</h2>" + _rows(report, [
            ("policy", "captions.policy"), ("caption column", "captions.column"),
            ("members compared with their kept row", "captions.members_with_similarity"),
            ("mean caption similarity to kept", "captions.mean_caption_similarity_to_kept"),
            ("caption clusters", "captions.caption_clusters"),
            ("groups with several captions", "captions.groups_with_several_captions"),
            ("rows kept for their caption", "captions.rows_kept_for_their_caption"),
            ("kept rows with merged captions", "captions.merged_rows")]))
    calibration = report.get("calibration") or []
    header = "<tr><th>threshold</th><th>pairs</th><th>groups</th><th>rows removed</th></tr>"
    body = "".join("<tr>" + "".join(_cell(report, f"calibration.{i}.{name}")
                                    for name in ("threshold", "pairs", "groups", "removed_rows")) + "</tr>"
                   for i in range(len(calibration)))
    sections.append(f"<h2>Per threshold</h2><p>From one search; each row is what a run at that threshold "
                    f"would remove.</p><table>{header}{body}</table>")
    histogram = report.get("similarity_histogram") or {}
    if histogram.get("counts"):
        edges = histogram["edges"]
        labels = [f"{edges[i]:.4f}–{edges[i + 1]:.4f}" for i in range(len(histogram["counts"]))]
        sections.append("<h2>Similarity of found pairs</h2>" + bar_chart(
            labels, histogram["counts"], "pairs per similarity bin (log scale)", log_y=True))
    sizes = report.get("group_sizes") or []
    sections.append("<h2>Group sizes</h2>" + loglog_chart([(s, c) for s, c in sizes], "groups by size (log-log)",
                                                          "group size (rows)", "groups"))
    buckets = report.get("bucket_size_histogram") or {}
    if buckets.get("counts"):
        edges = buckets["edges"]
        labels = [f"{edges[i]:,}–{edges[i + 1] - 1:,}" for i in range(len(buckets["counts"]))]
        sections.append("<h2>Bucket sizes</h2>" + _rows(report, [
            ("buckets", "bucketing.bucket_sizes.count"), ("median rows", "bucketing.bucket_sizes.median"),
            ("largest", "bucketing.bucket_sizes.max"), ("K per round", "bucketing.k"), ("m", "bucketing.m"),
            ("margin", "bucketing.margin"), ("buckets per row", "bucketing.buckets_per_row"),
            ("rounds", "bucketing.rounds")]) + bar_chart(labels, buckets["counts"], "buckets by rows (log2 bins)",
                                                         log_y=True))
    timings = report.get("timings_seconds") or {}
    stage_names = [name for name in timings if name != "total"]
    sections.append("<h2>Time per stage</h2><table><tr><th>stage</th><th>seconds</th></tr>" + "".join(
        f"<tr><td class=text>{html.escape(name)}</td>{_cell(report, 'timings_seconds.' + name)}</tr>"
        for name in [*stage_names, "total"]) + "</table>"
        + bar_chart(stage_names, [timings[name] for name in stage_names], "seconds per stage"))
    kernels_used = report.get("blas") or {}
    if kernels_used:
        items, advice = [], []
        for where in ("driver", "executor"):
            described = kernels_used.get(where) or {}
            items += [(f"{where}: {library}'s OpenBLAS kernels", f"blas.{where}.openblas.{library}")
                      for library in sorted(described.get("openblas") or {})]
            items += [(f"{where}: CPU vector level", f"blas.{where}.cpu"),
                      (f"{where}: OPENBLAS_CORETYPE", f"blas.{where}.OPENBLAS_CORETYPE")]
            advice += [f"{where}: {line}" for line in [*(described.get("warnings") or []), *(described.get("advice") or [])]]
        sections.append("<h2>Matrix-product kernels</h2>" + _rows(report, items)
                        + "".join(f"<p class=bad>{_text(line)}</p>" for line in advice))
    largest = report.get("largest_groups") or []
    rows = []
    for index, entry in enumerate(largest):
        for member in entry.get("members", []):
            role = "kept" if member.get("is_kept") else "least similar member"
            rows.append(f"<tr>{_cell(report, f'largest_groups.{index}.size')}<td>{role}</td>"
                        f"<td>{_fmt(member.get('row_id'))}</td><td>{_fmt(member.get('similarity_to_kept'))}</td>"
                        f"<td class=text>{_text(member.get('key'))}</td><td class=text>{_text(member.get('caption'))}</td>"
                        f"<td class=text>{_text(member.get('url'))}</td></tr>")
    sections.append(f"<h2>The {len(largest)} largest duplicate groups</h2><p>Each group's kept row and its least "
                    "similar member; all others lie between them.</p><table><tr><th>size</th><th>row</th><th>row_id</th>"
                    "<th>similarity to kept</th><th>key</th><th>caption</th><th>url</th></tr>" + "".join(rows) + "</table>")
    return (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>dedup-spark report</title>"
            f"<style>{_STYLE}</style></head><body>{''.join(sections)}</body></html>")
