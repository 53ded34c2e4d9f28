"""`zhtune deploy`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) on one engine.

    zhtune deploy --model_type gemma3-270m --port 8000 [--served_model_name NAME] [--api_key KEY]
                  [--max_concurrency 32] [--max_queue_size 256]

Endpoints: GET /v1/models, POST /v1/chat/completions (stream or not), POST /v1/completions,
GET /health (no key needed). The listening socket is bound before the model loads, so a port in
use, out of range or not allowed is one error line at once. `--max_concurrency` requests are handed
to the engine at once (it batches them), `--max_queue_size` more wait; beyond that: 503.
"""

import errno
import ipaddress
import socket

from zhtune.dry_run import print_dry_run
from zhtune.errors import UserError
from zhtune.infer.base import GenerationSettings
from zhtune.infer.engine import load_engine
from zhtune.log import logger
from zhtune.models.resolve import resolve_from_args


def deploy_main(args) -> int:
    resolved = resolve_from_args(args)
    if args.dry_run:
        print_dry_run("deploy", args, {**resolved.describe(), "url": f"http://{args.host}:{args.port}/v1"})
        return 0
    sock = bind_socket(args.host, args.port)  # before the model loads: a bad port fails at once
    try:
        if args.api_key is None and not is_loopback(args.host):
            logger.warning(f"serving on {args.host} without --api_key: anyone who reaches this port can use it")
        engine = load_engine(resolved, args)
        serve(engine, GenerationSettings.from_args(args, seed=None), sock, args)
    finally:
        sock.close()
    return 0


def serve(engine, defaults: GenerationSettings, sock: socket.socket, args) -> None:
    import uvicorn

    from zhtune.serve.app import create_app

    name = args.served_model_name or engine.name
    app = create_app(engine, defaults, model_name=name, max_concurrency=args.max_concurrency,
                     max_queue_size=args.max_queue_size, api_key=args.api_key)
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    logger.info(f"serving {name} at http://{shown}:{port}/v1 (max_concurrency {args.max_concurrency}, "
                f"max_queue_size {args.max_queue_size}{', api key required' if args.api_key else ''}; Ctrl-C stops)")
    config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="on",
                            backlog=2048, timeout_graceful_shutdown=5, timeout_keep_alive=30)
    uvicorn.Server(config).run(sockets=[sock])


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port, or a UserError that says what to change."""
    if not 1 <= port <= 65535:
        raise UserError(f"--port {port} is out of range: give 1..65535.")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UserError(f"--host {host!r} is not an address of this machine ({e}); e.g. 127.0.0.1 or 0.0.0.0.") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart may reuse a TIME_WAIT port
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"port {port} on {host} is already in use: stop what listens there or pick "
                            "another --port.") from None
        if e.errno == errno.EACCES:
            raise UserError(f"no permission to listen on {host}:{port} (ports below 1024 need root): pick "
                            "another --port.") from None
        if e.errno == errno.EADDRNOTAVAIL:
            raise UserError(f"--host {host} is not an address of this machine: e.g. 127.0.0.1 or 0.0.0.0.") from None
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}.") from None
    sock.set_inheritable(True)
    return sock
