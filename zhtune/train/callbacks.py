"""What a run records while it trains: logging.jsonl, loss curves in images/, the closing line."""

import json
import math
import time
from pathlib import Path

from transformers import TrainerCallback

from zhtune.files import staged_file
from zhtune.log import logger, still_running


def memory_gib() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    import psutil
    return psutil.Process().memory_info().rss / 2**30


class JsonlLogger(TrainerCallback):
    """Appends every log event (train and eval) to <run_dir>/logging.jsonl, on the main process.
    tokens_per_s and trained_tokens_per_s are this process's (per GPU): real tokens (padding never
    counts) and those of them with a label, since the last log line."""

    def __init__(self, run_dir: Path, trainer_ref):
        self.path = Path(run_dir) / "logging.jsonl"
        self.trainer_ref = trainer_ref
        self.last_time = None
        self.last_tokens = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_time, self.last_tokens = time.time(), self._counts()

    def _counts(self) -> tuple[int, int]:  # the trainer keeps them as device tensors: one sync per log line
        return int(self.trainer_ref.tokens_seen), int(self.trainer_ref.trained_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, "epoch": round(state.epoch or 0.0, 4), **logs}
        if "loss" in logs:
            now, tokens = time.time(), self._counts()
            seconds = max(now - self.last_time, 1e-9)
            row["tokens_per_s"] = round((tokens[0] - self.last_tokens[0]) / seconds, 1)
            row["trained_tokens_per_s"] = round((tokens[1] - self.last_tokens[1]) / seconds, 1)
            row["memory_gib"] = round(memory_gib(), 3)
            self.last_time, self.last_tokens = now, tokens
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


HEARTBEAT_EVERY = 30.0  # seconds


class StepHeartbeat(TrainerCallback):
    """A training step that runs longer than `every` seconds (the first steps of a compiled run compile the
    decoder layers: minutes on a GPU) logs "still in training step N (…s)" every `every` seconds, so a
    long step never looks like a hang. `first_step_note`, if given, is logged as the first step starts."""

    def __init__(self, every: float | None = None, first_step_note: str | None = None):
        self.every, self.first_step_note = every or HEARTBEAT_EVERY, first_step_note
        self._beat: still_running | None = None

    def on_step_begin(self, args, state, control, **kwargs):
        if self._beat is not None or not state.is_world_process_zero:
            return
        if self.first_step_note:
            logger.info(self.first_step_note)
            self.first_step_note = None
        self._beat = still_running(f"in training step {state.global_step + 1}", every=self.every).__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        self._stop()

    def on_train_end(self, args, state, control, **kwargs):
        self._stop()

    def _stop(self) -> None:
        if self._beat is not None:
            self._beat.__exit__(None, None, None)
            self._beat = None


class DivergenceGuard(TrainerCallback):
    """Stops a run at the first log line whose loss, gradient norm or eval loss is not finite (its weights
    are then no longer finite either), so that no such checkpoint is saved or called best. `finite_step`:
    the weights after this step are known finite (a finite training loss at step s was computed with the
    weights after step s - 1; a finite eval loss at step s, with those after step s)."""
    KEYS = ("loss", "grad_norm", "eval_loss")

    def __init__(self):
        self.finite_step = 0
        self.diverged: tuple[int, dict] | None = None  # (step, the non-finite values)

    def on_train_begin(self, args, state, control, **kwargs):
        self.finite_step = state.global_step  # a resumed run starts from its checkpoint's finite weights

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        bad = {key: logs[key] for key in self.KEYS
               if isinstance(logs.get(key), (int, float)) and not math.isfinite(logs[key])}
        if bad:
            self.diverged = self.diverged or (state.global_step, bad)
            control.should_training_stop, control.should_save, control.should_evaluate = True, False, False
        elif self.diverged is None and ("loss" in logs or "eval_loss" in logs):
            self.finite_step = max(self.finite_step, state.global_step - ("eval_loss" not in logs))
        return control

    def remove_later_checkpoints(self, run_dir: Path) -> list[str]:
        """Delete checkpoint-N folders saved after the last finite log line; returns their names."""
        import re
        import shutil
        steps = {p: int(m[1]) for p in Path(run_dir).iterdir() if (m := re.fullmatch(r"checkpoint-(\d+)", p.name))}
        later = sorted((p for p, step in steps.items() if step > self.finite_step), key=steps.get)
        for path in later:
            shutil.rmtree(path)
        return [p.name for p in later]

    def message(self, learning_rate: float, removed: list[str]) -> str:
        step, bad = self.diverged
        values = ", ".join(f"{key} {value}" for key, value in bad.items())
        gone = f"removed {', '.join(removed)}, saved after step {self.finite_step}; " if removed else ""
        return (f"training diverged at step {step} ({values}): the weights are no longer finite, so the run stopped "
                f"({gone}earlier checkpoints are sound). Lower --learning_rate (it was {learning_rate:g}) or train "
                "with --dtype fp32, and run again.")


def read_log(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "logging.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def smooth(values: list[float], weight: float = 0.9) -> list[float]:
    """TensorBoard-style exponential smoothing with debiasing."""
    out, last, n = [], 0.0, 0
    for v in values:
        n += 1
        last = last * weight + (1 - weight) * v
        out.append(last / (1 - weight ** n))
    return out


def plot_curves(run_dir: Path) -> list[Path]:
    """images/train_loss.png (raw and smoothed) and images/eval_loss.png, written atomically."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_log(run_dir)
    images = Path(run_dir) / "images"
    images.mkdir(parents=True, exist_ok=True)
    written = []
    for key, title in (("loss", "train loss"), ("eval_loss", "eval loss"), ("eval_token_acc", "eval token accuracy")):
        points = [(r["step"], r[key]) for r in rows if key in r and isinstance(r[key], (int, float))
                  and math.isfinite(r[key])]
        if not points:
            continue
        steps, values = zip(*points)
        fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
        ax.plot(steps, values, color="#9ecae1", linewidth=1, marker="o" if len(values) < 30 else None,
                markersize=3, label="raw")
        if key == "loss" and len(values) > 2:
            ax.plot(steps, smooth(list(values)), color="#08519c", linewidth=2, label="smoothed (0.9)")
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        out = images / f"{'train_' if key == 'loss' else ''}{key}.png"
        with staged_file(out) as tmp:
            fig.savefig(tmp)
        plt.close(fig)
        written.append(out)
    return written
