"""Results on screen and on disk: the model x dataset table and the files a run leaves behind.

    eval_outputs/<name>/<timestamp>/
      eval_result.jsonl        one row per (model, dataset): accuracy, counts, settings, per-item file
      <dataset>.jsonl          one row per item (one model), or <model>/<dataset>.jsonl (several models):
                               prompt, raw output, extracted answer, gold answer, correct, no_answer
Every file is written to a temporary name in its folder and renamed when complete.
"""

import math
import re
import time
from pathlib import Path


def slug(text: str) -> str:
    """A file-name-safe form of a model label: 'vx-1/checkpoint-10' -> 'vx-1_checkpoint-10'."""
    return re.sub(r"[^\w.+-]+", "_", text, flags=re.ASCII).strip("_.") or "model"


def new_output_dir(root: str | Path, name: str) -> Path:
    """root/name/<timestamp>, a folder not there yet (a suffix is added when two runs start in the same
    second). Nothing is created: the first result written creates it, so a run that fails before
    scoring anything leaves no empty folder."""
    base = Path(root) / slug(name)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out, n = base / stamp, 1
    while out.exists():
        out, n = base / f"{stamp}-{n}", n + 1
    return out



def wilson_interval(correct: int, total: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of an accuracy of correct/total (z = 1.96): (low, high).

    Unlike the normal approximation it stays inside [0, 1] and is meaningful at 0/n and n/n, which
    small evaluations hit. (0, 1) when total is 0."""
    if total <= 0:
        return 0.0, 1.0
    p = correct / total
    center = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, center - half), min(1.0, center + half)


def item_file(out_dir: Path, dataset: str, model_label: str, several_models: bool) -> Path:
    return (out_dir / slug(model_label) / f"{dataset}.jsonl") if several_models else (out_dir / f"{dataset}.jsonl")


def format_table(scores: dict[str, dict[str, float]], datasets: list[str]) -> str:
    """A Markdown table like the seed's: one row per model, accuracies to 4 decimals.

    With several models, one "change" row per later model gives its difference from the first (the
    base model when a base and checkpoints were given) per dataset.
    """
    models = list(scores)
    rows = [[m] + [_fmt(scores[m].get(d)) for d in datasets] for m in models]
    for m in models[1:]:
        first = models[0]
        rows.append([f"change {m} vs {first}"] +
                    [_fmt_change(scores[m].get(d), scores[first].get(d)) for d in datasets])
    header = ["Model"] + list(datasets)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(header, widths)) + " |",
             "| " + " | ".join("-" * w for w in widths) + " |"]
    lines += ["| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |" for r in rows]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _fmt_change(value: float | None, base: float | None) -> str:
    return "-" if value is None or base is None else f"{value - base:+.4f}"
