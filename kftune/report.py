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


def html_table(headers: Sequence[str], rows: Sequence[Sequence], *, escape: bool = True, css: str = "") -> str:
    """A table that scrolls inside its own box when wider than the page, so the page itself never does.

    ``escape=False`` takes headers and cells as HTML the caller has escaped.
    """
    quote = html.escape if escape else str
    head = "".join(f"<th>{quote(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td>{quote(_cell(v))}</td>" for v in row) + "</tr>" for row in rows
    )
    table_class = f" class='{css}'" if css else ""
    return f"<div class='scroll'><table{table_class}><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table></div>"


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
    # Readable from the Kubeflow Run UI's side pane (about 800 px) up: pictures and long text shrink or
    # wrap to the page's width, and a table wider than the page scrolls inside its own box.
    style = (
        "body{font-family:sans-serif;margin:1em;max-width:100%}table{border-collapse:collapse}"
        ".scroll{overflow-x:auto;margin:1em 0;max-width:100%}"
        "th,td{border:1px solid #ccc;padding:4px 8px;text-align:right;vertical-align:top}th{background:#f3f3f3}"
        "td:first-child,th:first-child{text-align:left}"
        "table.compare td{white-space:nowrap}"
        "table.compare td:nth-child(2),table.compare th:nth-child(2)"
        "{text-align:left;white-space:normal;min-width:4.5em;max-width:18em;overflow-wrap:anywhere}"
        "table.compare th,table.compare td{padding:4px 6px}"
        "img{max-width:100%;height:auto}pre{white-space:pre-wrap;overflow-wrap:anywhere}"
        "p{overflow-wrap:anywhere}"
        ".fail{color:#b00020;font-weight:bold}.pass{color:#137333;font-weight:bold}"
    )
    body = "\n".join(parts)
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h2>{html.escape(title)}</h2>\n{body}\n</body></html>"
    )


_PHASE_NAMES = {"continue": "training on", "head": "new head"}


def phase_name(phase: str) -> str:
    """A fine-tuning phase as the plot names it: continue -> training on, unfreeze2 -> unfreeze 2."""
    if phase.startswith("unfreeze") and phase[len("unfreeze"):].isdigit():
        return f"unfreeze {phase[len('unfreeze'):]}"
    return _PHASE_NAMES.get(phase, phase)


def history_plot(phases: list[dict], metrics: Sequence[str] = ("accuracy", "val_accuracy", "loss", "val_loss")) -> str:
    """Training curves across phases (one figure: accuracy and loss side by side).

    One colour for training, one for validation, named in the legend; with several phases
    a grey line marks where each next phase starts and the phase's name stands above its epochs.
    """
    fig, (acc_ax, loss_ax) = pyplot().subplots(1, 2, figsize=(9, 3.8), layout="constrained")
    colours = {"accuracy": "#1a73e8", "val_accuracy": "#e8710a", "loss": "#1a73e8", "val_loss": "#e8710a"}
    several = len(phases) > 1
    offset = 0
    for i, phase in enumerate(phases):
        history = phase["history"]
        epochs = len(next(iter(history.values()), []))
        xs = list(range(offset + 1, offset + epochs + 1))
        for name in metrics:
            if name in history:
                ax = acc_ax if "accuracy" in name else loss_ax
                label = ("validation" if name.startswith("val_") else "training") if i == 0 else None
                ax.plot(xs, history[name], marker=".", color=colours.get(name), label=label)
        if several and epochs:
            for ax in (acc_ax, loss_ax):
                ax.text((offset + 1 + offset + epochs) / 2, 1.01, phase_name(phase["phase"]), fontsize=9,
                        ha="center", va="bottom", transform=ax.get_xaxis_transform(), color="#555")
        offset += epochs
        if i < len(phases) - 1:
            for ax in (acc_ax, loss_ax):
                ax.axvline(offset + 0.5, color="#bbb", linewidth=1)
    for ax, name in ((acc_ax, "accuracy"), (loss_ax, "loss")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=10, loc="lower right" if name == "accuracy" else "upper right")
    if offset:
        from matplotlib.ticker import MaxNLocator

        for ax in (acc_ax, loss_ax):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return figure(fig)
