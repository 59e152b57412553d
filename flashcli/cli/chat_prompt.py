"""Reading a chat turn: from a pipe one line at a time, at a terminal with a prompt that never
loses a Ctrl-C.

Why the terminal's signals are off at the prompt: a Ctrl-C is normally the terminal's SIGINT,
and Python's readline sees a signal only when it interrupts the select() in which readline waits
for a key. One that arrives after the prompt is shown but before that select() begins (or while
Python runs between two prompts) is kept as a flag nobody checks, and the terminal discards
what was typed before it: the person sees neither their text nor a new prompt. So while a
prompt is up the terminal sends no signals (ISIG off) and Ctrl-C arrives as a character, in
order with the keys around it: readline takes it as a key bound to "drop the line, new prompt",
and without readline (stdout not a terminal) it ends the line (VEOL) and the line is dropped.
GNU readline turns ISIG back on whenever it sets the terminal up for a line, before it shows the
prompt: its set-up function (rl_prep_term_function) is wrapped so that ISIG is off again before
the prompt appears.
During a reply the terminal's own settings are back, so Ctrl-C is SIGINT and stops the reply
(cli_chat.StopOnInterrupt).
"""

from __future__ import annotations

import codecs
import ctypes
import os
import sys
import termios

import click

PROMPT = ">>> "
CTRL_C = "\x03"
# key sequences of our own, bound to the two readline commands Ctrl-C runs (a macro can only
# replay keys): unlikely to be typed, and not a prefix of any default binding
_KILL, _ACCEPT = r"\C-x\C-]\C-k", r"\C-x\C-]\C-m"


def read_piped_turn() -> str | None:
    """The next line of piped input (None at its end)."""
    line = sys.stdin.readline()
    return None if not line else line.rstrip("\r\n")


class TerminalPrompt:
    """The prompt at a terminal (stdin a tty): `read()` returns the next line typed, or None at
    Ctrl-D; `replying()` wraps a reply, during which Ctrl-C is SIGINT again. Restores the
    terminal's settings when the session ends, however it ends."""

    def __init__(self, fd: int = 0):
        self.fd = fd
        self.saved = termios.tcgetattr(fd)
        self.readline = sys.stdout.isatty()  # input() edits with readline only on two terminals
        if self.readline:
            import readline  # input() gains line editing and history

            self.lib = _gnu_readline(readline)
            if self.lib is None:  # libedit: no such binding; Ctrl-C stays a signal (may be lost before its select)
                self.saved_quiet = None
                return
            for binding in (
                f'"{_KILL}": kill-whole-line',
                f'"{_ACCEPT}": accept-line',
                rf'"\C-c": "{_KILL}{_ACCEPT}"',
            ):
                readline.parse_and_bind(binding)
            self._prep = _PREP(self._prep_without_signals)  # kept: readline calls it
            self._set_prep(self._prep)
        quiet = [list(x) if i == 6 else x for i, x in enumerate(self.saved)]
        quiet[3] &= ~termios.ISIG
        if not self.readline:  # canonical input: Ctrl-C ends the line, which is then dropped
            quiet[6][termios.VEOL] = CTRL_C.encode()
        self.saved_quiet = quiet

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.readline and self.saved_quiet is not None:
            self._set_prep(self.lib.rl_prep_terminal)
        termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)

    def _set_prep(self, function):
        ctypes.c_void_p.in_dll(self.lib, "rl_prep_term_function").value = ctypes.cast(function, ctypes.c_void_p).value

    def _prep_without_signals(self, meta_flag: int):
        """readline's own terminal set-up, then ISIG off (readline turns it on)."""
        self.lib.rl_prep_terminal(meta_flag)
        attrs = termios.tcgetattr(self.fd)
        attrs[3] &= ~termios.ISIG
        termios.tcsetattr(self.fd, termios.TCSANOW, attrs)

    def _quiet(self, on: bool):
        if self.saved_quiet is not None:  # TCSANOW: what was typed ahead stays to be read
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved_quiet if on else self.saved)

    def replying(self):
        """Context of a reply: the terminal's own settings (Ctrl-C is SIGINT)."""
        return _Replying(self)

    def read(self) -> str | None:
        self._quiet(True)
        while True:
            try:
                if self.readline:
                    line = input(PROMPT)
                else:
                    click.echo(PROMPT, err=True, nl=False)
                    line = self._read_canonical_line()
                    if not line:
                        return None
                    if line.endswith(CTRL_C):  # the line is dropped
                        click.echo("", err=True)
                        continue
                    line = line.rstrip("\r\n")
                return line
            except KeyboardInterrupt:  # a signal from elsewhere (or libedit's Ctrl-C): clears the line
                click.echo("", err=True)
            except EOFError:
                return None

    def _read_canonical_line(self) -> str:
        """One line as the terminal hands it over: up to Enter, or up to Ctrl-C (VEOL), which
        sys.stdin.readline() would not stop at; "" at Ctrl-D on an empty line."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        line = ""
        while True:
            chunk = os.read(self.fd, 4096)
            line += decoder.decode(chunk, final=not chunk)
            if not chunk or line.endswith(("\n", CTRL_C)):
                return line


class _Replying:
    def __init__(self, prompt: TerminalPrompt):
        self.prompt = prompt

    def __enter__(self):
        self.prompt._quiet(False)

    def __exit__(self, *exc):
        self.prompt._quiet(True)


_PREP = ctypes.CFUNCTYPE(None, ctypes.c_int)


def _gnu_readline(readline) -> ctypes.CDLL | None:
    """GNU readline's functions (through the readline module, linked to it), or None (libedit)."""
    backend = getattr(readline, "backend", None)  # Python 3.13+
    if backend not in (None, "readline") or "libedit" in (readline.__doc__ or ""):
        return None
    try:
        lib = ctypes.CDLL(readline.__file__)
        lib.rl_prep_terminal.argtypes = [ctypes.c_int]
        ctypes.c_void_p.in_dll(lib, "rl_prep_term_function")
    except (OSError, AttributeError, ValueError):
        return None
    return lib
