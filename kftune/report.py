"""HTML and Markdown for the Kubeflow UI: tables and embedded plots.

The UI shows an HTML artifact in a sandboxed frame with no access to other
files, so pictures are embedded as base64 PNG data URIs.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(v).replace("|", "\\|") for v in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    """A plain fixed-width table for terminals."""
    cells = [list(headers)] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    out = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def html_table(headers: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(fig) -> str:
    """A matplotlib figure as an embedded <img>; the figure is closed."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    pyplot().close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="plot" src="data:image/png;base64,{data}"/>'


def pyplot():
    """matplotlib's pyplot on the Agg backend: components run with no display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def page(title: str, *parts: str) -> str:
    style = (
        "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;margin:1em 0}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f3f3f3}"
        ".fail{color:#b00020;font-weight:bold}.pass{color:#137333;font-weight:bold}"
    )
    body = "\n".join(parts)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>"
    )


def history_plot(phases: list[dict], metrics: Sequence[str] = ("accuracy", "val_accuracy", "loss", "val_loss")) -> str:
    """Training curves across phases (one figure: accuracy and loss side by side)."""
    fig, (acc_ax, loss_ax) = pyplot().subplots(1, 2, figsize=(10, 4))
    offset = 0
    for phase in phases:
        history = phase["history"]
        epochs = len(next(iter(history.values()), []))
        xs = list(range(offset + 1, offset + epochs + 1))
        for name in metrics:
            if name in history:
                ax = acc_ax if "accuracy" in name else loss_ax
                ax.plot(xs, history[name], marker=".", label=f"{phase['phase']} {name}")
        offset += epochs
        acc_ax.axvline(offset + 0.5, color="#ddd")
        loss_ax.axvline(offset + 0.5, color="#ddd")
    for ax, name in ((acc_ax, "accuracy"), (loss_ax, "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.legend(fontsize=7)
    return figure(fig)
