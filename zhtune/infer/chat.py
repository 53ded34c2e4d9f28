"""The interactive chat loop of `zhtune infer`.

On a terminal: prompt `<<< `, line editing (readline), replies streamed token by token. With stdin not
a terminal, each input line is one turn of the same conversation (commands included) and the replies
go to stdout, so a session can be piped.
"""

import sys

from zhtune.errors import UserError
from zhtune.infer.base import Engine, GenerationSettings
from zhtune.log import logger

SEPARATOR = "-" * 50
HELP = ("commands: exit | quit, clear (forget the conversation), reset-system (the next line is the system "
        "prompt), multi-line (end input with #), single-line")


def run_chat(engine: Engine, settings: GenerationSettings, stdin=None, stdout=None, verbose: bool = False,
             stream: bool = True) -> None:
    """`stream`: print the reply as it is generated (else once, whole). A turn whose generation fails
    says why and keeps the conversation as it was before that turn."""
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    interactive = stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing for input()
        except ImportError:
            pass
        print(HELP, file=stdout, flush=True)
    history: list[dict] = []
    multi_line = False
    expect_system = False
    while True:
        query = _read(stdin, stdout, interactive, multi_line)
        if query is None:
            break
        command = query.strip()
        if expect_system:
            engine.system = command or None
            history, expect_system = [], False
            print("[system prompt set; conversation cleared]", file=stdout, flush=True)
            continue
        if command in ("exit", "quit"):
            break
        if command == "clear":
            history = []
            print("[conversation cleared]", file=stdout, flush=True)
            continue
        if command == "reset-system":
            expect_system = True
            continue
        if command in ("multi-line", "single-line"):
            multi_line = command == "multi-line"
            print(f"[{command} input{': end with #' if multi_line else ''}]", file=stdout, flush=True)
            continue
        if not command:
            continue
        messages = history + [{"role": "user", "content": query}]
        if verbose:
            print(f"[prompt] {engine.render_prompt(messages)!r}", file=sys.stderr, flush=True)
        reply = ""
        try:
            if stream:
                for piece in engine.stream(messages, settings):
                    reply += piece
                    print(piece, end="", file=stdout, flush=True)
            else:
                reply = engine.generate([messages], settings, batch_size=1)[0]
                print(reply, end="", file=stdout, flush=True)
        except (UserError, RuntimeError, ValueError) as e:
            logger.error(f"this turn failed ({type(e).__name__}: {e}); the conversation is kept as before it")
            print(f"\n{SEPARATOR}", file=stdout, flush=True)
            continue
        print(f"\n{SEPARATOR}", file=stdout, flush=True)
        history = messages + [{"role": "assistant", "content": reply.strip()}]


def _read(stdin, stdout, interactive: bool, multi_line: bool) -> str | None:
    lines = []
    while True:
        prompt = "<<< " if not lines else ""
        try:
            if interactive and stdin is sys.stdin:
                line = input(prompt)
            else:
                if interactive:
                    print(prompt, end="", file=stdout, flush=True)
                line = stdin.readline()
                if not line:
                    return None if not lines else "\n".join(lines)
                line = line.rstrip("\n")
        except EOFError:
            return None if not lines else "\n".join(lines)
        if not multi_line:
            return line
        if line.endswith("#"):
            lines.append(line[:-1])
            return "\n".join(lines)
        lines.append(line)
