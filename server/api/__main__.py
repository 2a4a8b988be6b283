"""`python -m server.api [flags]`: the same as `pdserve serve [flags]`."""

from __future__ import annotations

import argparse
import sys

from server.api.launch import add_serve_args, run_serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m server.api", description="Serve the OpenAI API."
    )
    add_serve_args(parser)
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
