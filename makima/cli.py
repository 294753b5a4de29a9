"""The ``makima`` command line.

It talks to a makima server only over its REST API and the daemon websocket,
never through Django, so that it runs on worker machines without the server's
settings or database.
"""

from __future__ import annotations

import sys

USAGE = """usage: makima <command> …

Agent-facing:    directive add-step | batch-add-steps | remove-step | update | show
                 contract files | file | create-file
                 supervisor complete
Operator-facing: daemon run | directive create | directive watch

The commands arrive with the worker runtime; this build only has the server.
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args or args[0] in ("-h", "--help", "help"):
        sys.stdout.write(USAGE)
        return 0
    sys.stderr.write(f"makima: '{args[0]}' is not available in this build\n{USAGE}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
