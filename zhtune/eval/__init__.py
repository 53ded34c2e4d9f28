"""`zhtune eval`: benchmarks (one file each), answer extraction, tables. Entry: evaluate.eval_main."""

from zhtune.eval.base import bundled_samples_dir, quickstart_items_dir


def run_evaluation(args, **kwargs) -> dict:
    """{"scores": {model: {dataset: accuracy}}, "output_dir": ..., ...}; see zhtune.eval.evaluate."""
    from zhtune.eval.evaluate import run_evaluation as run
    return run(args, **kwargs)


__all__ = ["bundled_samples_dir", "quickstart_items_dir", "run_evaluation"]
