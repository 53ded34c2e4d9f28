"""The table printed before training: rows per entry, token lengths, and what was dropped and why."""


def entry_label(entry: dict) -> str:
    subset = entry.get("subset")
    return entry["name"] + (":" + "/".join(subset) if subset else "")


def format_statistics(split, encoded_train=None, encoded_val=None) -> str:
    labels = [entry_label(e) for e in split.entries]
    width = max([len("dataset")] + [len(label) for label in labels])
    lines = [f"{'dataset':<{width}}  {'requested':>9}  {'train':>7}  {'val':>6}"]
    for label, e in zip(labels, split.entries):
        requested = "all" if e["requested"] is None else str(e["requested"])
        lines.append(f"{label:<{width}}  {requested:>9}  {e['train']:>7}  {e['val']:>6}")
    lines.append(f"{'total':<{width}}  {'':>9}  {len(split.train):>7}  {len(split.val):>6}")
    for name, encoded in (("train", encoded_train), ("val", encoded_val)):
        if encoded is not None:
            cached = " (encoded earlier, from the cache)" if encoded.stats.get("from_cache") else ""
            lines.append(f"{name} tokens: {_lengths(encoded.stats)}; dropped: {_dropped(encoded)}{cached}")
    return "\n".join(lines)


def _lengths(stats: dict) -> str:
    if not stats.get("rows"):
        return "no rows"
    return (f"{stats['rows']} rows, length mean {stats['mean']}, min {stats['min']}, max {stats['max']}, "
            f"{stats.get('trained_tokens', 0)} trained tokens")


def _dropped(encoded) -> str:
    if not encoded.dropped:
        return "none"
    reasons = ", ".join(f"{reason}: {count}" for reason, count in encoded.stats.get("dropped_reasons", {}).items())
    return f"{encoded.dropped} ({reasons})"
