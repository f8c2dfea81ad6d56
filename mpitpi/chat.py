"""Interactive multi-turn chat: rank 0 reads the user's lines, every rank generates.

Each turn rank 0 sends one command (``"turn"`` or ``"quit"``, Comm.send_command), then all ranks
run ``generate`` together on the whole conversation so far, rendered by the chat template; the
positions already cached from earlier turns are reused, so a turn prefills only what is new.
``/reset`` forgets the history, ``/quit`` or end of input (Ctrl-D) ends every rank cleanly.
"""
from __future__ import annotations

import sys

from mpitpi.errors import MpitpiError
from mpitpi.generate import generate
from mpitpi.session import Session, check_prompt

HELP = "commands: /reset forgets the conversation, /quit (or Ctrl-D) leaves"


def _read(prompt: str) -> str | None:
    """The user's next line; None at end of input. A line that is not UTF-8 is refused
    with a message and an empty line is returned (so the prompt comes again)."""
    try:
        return input(prompt)
    except EOFError:
        return None
    except UnicodeDecodeError as e:
        print(f"mpitpi: that line is not UTF-8 text (byte {e.start}); type it again.",
              file=sys.stderr, flush=True)
        return ""


def run_chat(comm, loaded, tokenizer, make_sampler, max_tokens: int,
             system: str | None = None, interactive: bool | None = None, draft: int = 0,
             drafter=None) -> None:
    """Collective. ``tokenizer`` and ``make_sampler()`` are used on rank 0 only. Each turn
    reuses the cached positions of the conversation so far (generate's KV slot 0), so only
    the new message is prefilled; ``draft``: tokens guessed per pass (0: off)."""
    root = comm.rank == 0
    if interactive is None:
        interactive = sys.stdin.isatty()
    history: list[dict] = [{"role": "system", "content": system}] if system else []
    if root:
        print(f"mpitpi chat on {comm.size} ranks; {HELP}", file=sys.stderr, flush=True)
    while True:
        ids = None
        if root:
            line = _read("> " if interactive else "")
            while line is not None and line.strip() in ("", "/reset", "/help"):
                if line.strip() == "/reset":
                    history = history[:1] if system else []
                    print("(conversation reset)", file=sys.stderr, flush=True)
                elif line.strip() == "/help":
                    print(HELP, file=sys.stderr, flush=True)
                line = _read("> " if interactive else "")
            if line is None or line.strip() == "/quit":
                cmd = "quit"
            else:
                history.append({"role": "user", "content": line})
                try:
                    ids = tokenizer.encode_chat(history)
                    check_prompt(ids, max_tokens, loaded.args.vocab_size,
                                 loaded.args.max_seq_len)
                    cmd = "turn"
                except MpitpiError as e:
                    print(f"mpitpi: {e} Use /reset to start over.", file=sys.stderr, flush=True)
                    history.pop()
                    continue
        else:
            cmd = None
        if root:   # the others wait idle (not watched for a stall) while the user types
            comm.send_command(cmd)
        else:
            cmd = comm.wait_command()
        if cmd == "quit":
            return

        def emit(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        session = Session(ids, max_tokens, make_sampler(), loaded.args.eos_token_ids,
                          tokenizer.decode, on_text=emit) if root else None
        res = generate(comm, loaded.model, session, draft=draft, drafter=drafter)
        if root:
            print(flush=True)
            print(f"[{len(res.token_ids)} tokens, {res.cached_tokens} of {res.prompt_tokens} "
                  f"prompt tokens cached, TTFT {res.ttft_ms:.0f} ms, "
                  f"{res.ms_per_token:.1f} ms/token]", file=sys.stderr, flush=True)
            history.append({"role": "assistant", "content": res.text})
