"""A bounded load test of `zhtune deploy` on loopback: the server as it is against a serialized
baseline, side by side in one run.

    python benchmarks/serve_load.py --model_type gemma3-270m --requests 100 --concurrency 20 --max_tokens 16

The script starts one server per variant (`python -m zhtune deploy` on a free loopback port) and waits
for their /health; then, for each mode (non-streaming, streaming) and each variant in turn, it sends one
warm-up request and `--requests` chat requests from `--concurrency` client threads. Variants:

- `new`: the server as configured by default, with `--max_concurrency` = the client concurrency: all
  requests are handed to the engine at once (it batches them if it can);
- `serialized`: the same server with `--max_concurrency 1` (and a queue big enough for every client):
  one request generates at a time, which is what the old `http.server` deploy did behind its global lock.
  (The old implementation itself is not served: on 20 clients its listen backlog of 5 resets
  connections, and it reports no usage, so it could not be measured on the same terms.)

Printed per variant and mode: successes, p50/p95 latency (whole reply), p50 time to the first content
chunk (streams), completion tokens per second over the phase's wall time, and the server's RSS before
and after (from /proc). Every request has a timeout (`--request_timeout`), so a run is bounded.
Requests are greedy (temperature 0) with distinct prompts, the same for every variant.
"""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


class Server:
    def __init__(self, args, max_concurrency: int, max_queue_size: int, log: Path):
        self.port = free_port()
        cmd = [sys.executable, "-m", "zhtune", "deploy", "--model_type", args.model_type, "--port", str(self.port),
               "--max_concurrency", str(max_concurrency), "--max_queue_size", str(max_queue_size),
               "--max_new_tokens", str(args.max_tokens), *args.deploy_args]
        env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self.log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + args.start_timeout
        while True:
            if self.proc.poll() is not None:
                raise SystemExit(f"the server exited ({self.proc.returncode}); see {log}")
            try:
                if httpx.get(f"{self.base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"the server did not start within {args.start_timeout}s; see {log}")
            time.sleep(0.3)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def one_request(client: httpx.Client, i: int, stream: bool, max_tokens: int) -> dict:
    body = {"messages": [{"role": "user", "content": f"请用一句话介绍数字{i}。"}], "max_tokens": max_tokens,
            "temperature": 0, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    start = time.monotonic()
    first, tokens, finish = None, 0, None
    try:
        if not stream:
            r = client.post("/v1/chat/completions", json=body)
            if r.status_code != 200:
                return {"ok": False, "error": f"{r.status_code} {r.text[:200]}"}
            reply = r.json()
            tokens, finish = reply["usage"]["completion_tokens"], reply["choices"][0]["finish_reason"]
        else:
            with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return {"ok": False, "error": f"{r.status_code} {r.read()[:200]!r}"}
                for line in r.iter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        return {"ok": False, "error": chunk["error"]["message"]}
                    if chunk.get("usage"):
                        tokens = chunk["usage"]["completion_tokens"]
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content") and first is None:
                            first = time.monotonic() - start
                        finish = choice["finish_reason"] or finish
        if finish not in ("stop", "length"):
            return {"ok": False, "error": f"no finish_reason (got {finish!r})"}
    except httpx.HTTPError as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    return {"ok": True, "latency": time.monotonic() - start, "ttft": first, "tokens": tokens}


def run_phase(server: Server, args, stream: bool) -> dict:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    with httpx.Client(base_url=server.base, timeout=args.request_timeout, limits=limits) as client:
        one_request(client, -1, stream, args.max_tokens)  # warm-up
        rss_before = rss_mib(server.proc.pid)
        start = time.monotonic()
        with ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda i: one_request(client, i, stream, args.max_tokens), range(args.requests)))
        wall = time.monotonic() - start
        rss_after = rss_mib(server.proc.pid)
    ok = [r for r in results if r["ok"]]
    latencies = [r["latency"] for r in ok]
    ttfts = [r["ttft"] for r in ok if r.get("ttft") is not None]
    errors = sorted({r["error"] for r in results if not r["ok"]})
    return {"mode": "stream" if stream else "non-stream", "ok": len(ok), "requests": len(results),
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95),
            "ttft_p50_s": percentile(ttfts, 0.5), "tokens": sum(r["tokens"] for r in ok),
            "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "wall_s": wall,
            "rss_before_mib": rss_before, "rss_after_mib": rss_after, "errors": errors[:5]}


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model_type", default="gemma3-270m")
    p.add_argument("--requests", type=int, default=100)
    p.add_argument("--concurrency", type=int, default=20)
    p.add_argument("--max_tokens", type=int, default=16)
    p.add_argument("--variants", default="new,serialized", help="comma-separated: new, serialized")
    p.add_argument("--modes", default="non-stream,stream", help="comma-separated: non-stream, stream")
    p.add_argument("--request_timeout", type=float, default=600.0)
    p.add_argument("--start_timeout", type=float, default=300.0)
    p.add_argument("--out", help="write the results as JSON here")
    p.add_argument("--log_dir", default="/tmp", help="where the servers' logs go")
    p.add_argument("deploy_args", nargs="*", help="more `zhtune deploy` flags, after --")
    args = p.parse_args(argv)

    settings = {"new": (args.concurrency, args.requests), "serialized": (1, args.requests)}
    rows = []
    servers = {}
    try:  # every variant's server is up at once (idle ones use no CPU); phases alternate between them,
        # so a machine whose load drifts treats the variants alike
        for variant in args.variants.split(","):
            max_concurrency, queue = settings[variant]
            servers[variant] = Server(args, max_concurrency, queue, Path(args.log_dir) / f"serve_load-{variant}.log")
        for mode in args.modes.split(","):
            for variant, server in servers.items():
                row = {"variant": variant, "max_concurrency": settings[variant][0],
                       **run_phase(server, args, stream=(mode == "stream"))}
                rows.append(row)
                print(f"  {variant:<10} {row['mode']:<10} ok {row['ok']}/{row['requests']}  p50 {fmt(row['p50_s'])}s  "
                      f"p95 {fmt(row['p95_s'])}s  {fmt(row['tokens_per_s'], '.1f')} tok/s", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.stop()

    print(f"\n{args.requests} requests, concurrency {args.concurrency}, max_tokens {args.max_tokens}, "
          f"model {args.model_type}")
    print("| variant | max_concurrency | mode | ok | p50 s | p95 s | TTFT p50 s | tokens/s | wall s | RSS MiB before → after |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['max_concurrency']} | {r['mode']} | {r['ok']}/{r['requests']} | {fmt(r['p50_s'])} | "
              f"{fmt(r['p95_s'])} | {fmt(r['ttft_p50_s'])} | {fmt(r['tokens_per_s'], '.1f')} | {fmt(r['wall_s'], '.1f')} | "
              f"{fmt(r['rss_before_mib'], '.0f')} → {fmt(r['rss_after_mib'], '.0f')} |")
        for e in r["errors"]:
            print(f"    error: {e}")
    by = {(r["variant"], r["mode"]): r for r in rows}
    for mode in args.modes.split(","):
        new, old = by.get(("new", mode)), by.get(("serialized", mode))
        if new and old and new["p50_s"] and old["p50_s"]:
            print(f"{mode}: p50 serialized / new = {old['p50_s'] / new['p50_s']:.2f}x, "
                  f"tokens/s new / serialized = {new['tokens_per_s'] / old['tokens_per_s']:.2f}x")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "date": time.strftime("%Y-%m-%d %H:%M"),
                                             "rows": rows}, indent=2))
    return 0 if all(r["ok"] == r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
