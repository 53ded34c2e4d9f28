"""Helpers shared by the tests (conftest.py only holds fixtures): small data files in every format,
written by the tests themselves, a chat dataset, a stand-in template, and reading a pseudo-terminal."""

import contextlib
import json
import os
import pty
import random
import select
import sys
import time
from pathlib import Path

from zhtune.templates import IGNORE_INDEX, Encoded

# One conversation, (system, [(user, assistant), ...]), written in each row format below.
SYSTEM = "你是一个乐于助人的助手。"
TURNS = [("浙江的省会是哪里？", "杭州。"), ("那江苏呢？", "南京。")]
EXPECTED = ([{"role": "system", "content": SYSTEM}]
            + [m for q, a in TURNS for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})])


def row_in_format(fmt: str, i: int = 0) -> dict:
    """The conversation above (its last reply numbered i) as one row of `fmt`."""
    (q1, a1), (q2, a2) = TURNS
    a2 = f"{a2[:-1]}{i}。"
    if fmt == "messages":
        return {"messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": q1},
                             {"role": "assistant", "content": a1}, {"role": "user", "content": q2},
                             {"role": "assistant", "content": a2}]}
    if fmt == "sharegpt":
        return {"conversations": [{"from": "system", "value": SYSTEM}, {"from": "human", "value": q1},
                                  {"from": "gpt", "value": a1}, {"from": "human", "value": q2},
                                  {"from": "gpt", "value": a2}]}
    if fmt == "alpaca":
        return {"system": SYSTEM, "history": [[q1, a1]], "instruction": q2, "input": "", "output": a2}
    if fmt == "query/response":
        return {"system": SYSTEM, "history": [[q1, a1]], "query": q2, "response": a2}
    raise ValueError(fmt)


def expected_messages(i: int = 0) -> list[dict]:
    out = [dict(m) for m in EXPECTED]
    out[-1]["content"] = f"{TURNS[-1][1][:-1]}{i}。"
    return out


def write_rows(path: Path, rows: list[dict]) -> Path:
    """Rows to .jsonl, .json, .csv (nested fields as JSON text) or .parquet, by the file's suffix."""
    path = Path(path)
    suffix = path.suffix
    if suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif suffix == ".json":
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=1), encoding="utf-8")
    elif suffix == ".csv":
        import pandas as pd
        flat = [{k: json.dumps(v, ensure_ascii=False) if isinstance(v, (list, dict)) else v for k, v in r.items()}
                for r in rows]
        pd.DataFrame(flat).to_csv(path, index=False)
    elif suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    else:
        raise ValueError(suffix)
    return path


def qa_rows(n: int, prefix: str = "q") -> list[dict]:
    return [{"query": f"{prefix}{i}", "response": f"answer {i}"} for i in range(n)]


class CharTemplate:
    """A picklable stand-in for a chat template: one token per character, replies trained."""

    name = "chars"
    default_system = None

    def __init__(self):
        self.tokenizer = CharTokenizer()

    def encode(self, messages, add_generation_prompt=False) -> Encoded:
        ids, labels = [], []
        for m in messages:
            tokens = [ord(c) % 1000 for c in f"<{m['role']}>{m['content']}"]
            ids += tokens
            labels += tokens if m["role"] == "assistant" else [IGNORE_INDEX] * len(tokens)
        return Encoded(ids, labels)


class CharTokenizer:
    name_or_path = "chars"

    def __len__(self):
        return 1000


def write_chat_jsonl(path: Path, n: int, seed: int = 0) -> Path:
    """n short Chinese Q&A rows in the messages format."""
    rng = random.Random(seed)
    cities = [("浙江", "杭州"), ("江苏", "南京"), ("广东", "广州"), ("四川", "成都"), ("湖北", "武汉"), ("湖南", "长沙")]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            province, city = rng.choice(cities)
            row = {"messages": [{"role": "user", "content": f"{province}的省会在哪？({i})"},
                                {"role": "assistant", "content": f"{province}的省会是{city}。"}]}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


def load_benchmark(name: str):
    """A script of benchmarks/ (not a package) imported as a module, e.g. load_benchmark("sft_speed")."""
    import importlib.util
    path = Path(__file__).resolve().parent.parent / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def read_until(fd, marker: str, timeout: float = 120) -> str:
    out, deadline = b"", time.time() + timeout
    while time.time() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.5)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            out += chunk
            if marker.encode() in out:
                return out.decode("utf-8", "replace")
    raise AssertionError(f"did not see {marker!r}; got: {out.decode('utf-8', 'replace')[-2000:]}")


class Terminal:
    """`python -m zhtune ARGV` in a pseudo-terminal, as a user at the `<<< ` prompt."""

    def __init__(self, fd: int):
        self.fd = fd

    def say(self, line: str, timeout: float = 120) -> str:
        """Type a line; what the program printed until its next prompt."""
        os.write(self.fd, (line + "\n").encode())
        return read_until(self.fd, "<<< ", timeout)

    @staticmethod
    def prompt_line(output: str) -> str:
        """The `[prompt]` line that --verbose prints: the encoded conversation."""
        return next(line for line in output.splitlines() if line.startswith("[prompt]"))


@contextlib.contextmanager
def terminal(argv: list[str], first_prompt_timeout: float = 120):
    """Yields a Terminal once the first prompt shows; `exit` must end the program with status 0."""
    pid, fd = pty.fork()
    if pid == 0:
        os.execv(sys.executable, [sys.executable, "-m", "zhtune", *argv])
    try:
        read_until(fd, "<<< ", first_prompt_timeout)
        yield Terminal(fd)
        os.write(fd, b"exit\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        try:
            os.kill(pid, 9)
        except ProcessLookupError:
            pass
