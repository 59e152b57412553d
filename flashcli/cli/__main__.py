"""`python -m flashcli.cli`: the command line, as the `flashcli` entry point runs it."""

from .main import main

main()
