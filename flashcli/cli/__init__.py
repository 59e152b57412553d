"""The command line: options, output formats, the chat terminal; errors become one line here.

What lives here: the click group and its commands (main), the options they share (options),
one prompt's output (generate), the `--batch` command (batch), the chat loop and its terminal
prompt (chat, chat_prompt), stats for `--stats-json` (stats_output) and `flashcli info` (info).

May import: everything in flashcli. Nothing imports it but the entry point and the tests.
"""

from .main import cli, main

__all__ = ["cli", "main"]
