"""The model card: README.md in every exported version, written from its metadata.json alone.

A person who opens an export folder (or the export step in the Run UI) reads
what the model classifies, on which data, how well every candidate did on the
held-out test split, what the gate demanded, how the model was built, how to
call it, where it is weak, and which code made it. Nothing is measured here:
every figure comes from metadata.json, so the card and the metadata never
disagree.
"""

from __future__ import annotations

# A class whose test recall is below this is named under "Known limits".
WEAK_RECALL = 0.9


def _percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def _kib(n: int | float) -> str:
    return f"{n / 1024:,.0f} KiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _flat(values: dict, prefix: str = "") -> dict:
    """Nested settings (the prune step's own) as one row each, ``prune.target_sparsity``: a table fits the side pane."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        elif value not in ("", None):
            out[f"{prefix}{key}"] = value
    return out


def _number(value) -> str:
    return f"{value:.4f}" if isinstance(value, float) and not float(value).is_integer() else f"{value:,.0f}" if isinstance(value, int | float) else str(value)


def _candidates(metadata: dict) -> str:
    evaluations = metadata.get("evaluations") or []
    if not evaluations:
        return "Only the exported candidate was recorded:\n\n" + _table(
            ["metric", "value"], [[k, _number(v)] for k, v in (metadata.get("metrics") or {}).items()])
    chosen = metadata.get("candidate", "")
    rows = [[f"**{e['name']}** (exported)" if e["name"] == chosen else e["name"], e.get("model_file", ""),
             f"{e['accuracy']:.4f}", f"{e.get('top_k_accuracy', 0):.4f}", _kib(e["size_bytes"]), _kib(e["gzip_bytes"]),
             f"{e['parameters']:,}", f"{e['latency_ms_batch1']:.2f}", f"{e['latency_ms_batch32']:.2f}"]
            for e in evaluations]
    top_k = evaluations[0].get("top_k", 5)
    return _table(["candidate", "file", "accuracy", f"top-{top_k}", "size", "gzip", "parameters", "ms (1 image)",
                   "ms (32 images)"], rows)


def _limits(metadata: dict) -> list[str]:
    """Where the exported candidate is weak, from its own per-class figures and the test split's size."""
    limits = []
    chosen = next((e for e in metadata.get("evaluations") or [] if e["name"] == metadata.get("candidate")), None)
    if chosen:
        weak = [(name, recall) for name, recall in zip(chosen["class_names"], chosen["recall"], strict=True)
                if recall < WEAK_RECALL]
        if weak:
            listed = ", ".join(f"`{name}` {_percent(recall)}" for name, recall in sorted(weak, key=lambda w: w[1]))
            limits.append(f"Classes with test recall below {_percent(WEAK_RECALL)}: {listed}.")
        else:
            limits.append(f"Every class has test recall of at least {_percent(WEAK_RECALL)}.")
        examples = chosen.get("examples", 0)
        if examples:
            limits.append(f"The test split has {examples} images: one image is {100 / examples:.2f} points of "
                          "accuracy, so smaller differences between candidates are noise.")
    limits.append("It knows only these classes: any image gets one of them, with no 'none of these' answer.")
    serving = metadata.get("serving") or {}
    if serving.get("runtime") == "kftune":
        limits.append("The exported candidate is an int8 TFLite file: TF Serving and KServe's tensorflow runtime "
                      "serve the float SavedModel beside it (the same pruned weights), not the int8 file; "
                      "`kftune serve` serves the int8 file.")
    return limits


def render(metadata: dict) -> str:
    """The card of a version, as Markdown, from its metadata.json document."""
    serving = metadata.get("serving") or {}
    classes = serving.get("class_names") or metadata.get("class_names") or []
    chosen = metadata.get("candidate") or serving.get("candidate", "")
    version = metadata.get("version", "")
    metrics = metadata.get("metrics") or {}
    headline = f"test accuracy {metrics['accuracy']:.4f}, " if "accuracy" in metrics else ""
    size = serving.get("image_size", 0)
    parts = [
        f"# Model card: version {version}",
        f"An image classifier of {len(classes)} classes, {size}x{size} pixels in "
        f"({'grayscale' if serving.get('channels') == 1 else 'colour'}; any image is resized to that). "
        f"Exported candidate: **{chosen}** ({headline}{serving.get('model_file', '')}), from run "
        f"`{metadata.get('source_run', '')}`, {metadata.get('exported_at', '')}.",
        "## Classes",
        ", ".join(f"`{name}`" for name in classes) or "(not recorded)",
        "## Data",
        _table(["", ""], [
            ["source", f"`{metadata.get('data_source', '')}`"],
            ["fingerprint (SHA-256 of the ingested shards)", f"`{metadata.get('data_fingerprint', '')}`"],
            *[[f"{split} images", n] for split, n in (metadata.get("splits") or {}).items()],
        ]),
        "## Every candidate on the held-out test split",
        _candidates(metadata),
    ]
    gate = metadata.get("gate") or {}
    if gate:
        size_limit = f"gzip size at most {_kib(gate['max_size_bytes'])}" if gate.get("max_size_bytes") else "no size limit"
        parts += ["## The gate",
                  f"Test accuracy at least {gate.get('min_accuracy', 0)}, at most {gate.get('max_accuracy_drop', 0)} "
                  f"below the search winner (baseline), {size_limit}; the smallest candidate that meets every "
                  f"threshold is exported."]
    hyperparameters = _flat(metadata.get("hyperparameters") or {})
    if hyperparameters:
        parts += ["## Hyperparameters", _table(["name", "value"], [[f"`{k}`", f"`{v}`"] for k, v in
                                                                   sorted(hyperparameters.items())])]
    name = "my-model"
    parts += [
        "## How to call it",
        "```bash\n"
        "kftune predict <this version or its base> photo.jpg            # offline, one line per image\n"
        f"kftune serve <this version or its base> --name {name}          # KServe's V1 and V2 REST on :8080\n"
        f"curl -s localhost:8080/v1/models/{name}:predict \\\n"
        '  -d "{\\"instances\\": [{\\"image_bytes\\": {\\"b64\\": \\"$(base64 -w0 photo.jpg)\\"}}]}"\n'
        "```",
        "TF Serving and KServe's `tensorflow` runtime load the SavedModel from the base: `serving_default` takes "
        "`image_bytes` (JPEG, PNG, GIF or BMP, any size) and returns `labels` and `scores` (best first); "
        "`serving_keyed` also takes and returns a `key`; `serving_pixels` takes float pixels 0-255.",
        "## Known limits",
        "\n".join(f"- {line}" for line in _limits(metadata)),
    ]
    code = metadata.get("code_version") or {}
    if code:
        parts += ["## How it was made", _table(["", ""], [[k, f"`{v}`"] for k, v in code.items() if v not in ("", None)])]
    if metadata.get("parameters"):
        parts += ["Run it again with the same parameters and compare the figures: "
                  "`kftune reproduce <this version's URI>`."]
    return "\n\n".join(parts) + "\n"
