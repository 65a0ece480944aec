"""`python -m server`: the same as the `llmrec-server` console script."""

from llmrec.server.cli import app

app(prog_name="llmrec-server")
