"""The git branch names makima accepts, for the API and the dashboard alike.

What git accepts as a branch name (``git check-ref-format``), less names that a
git command line would read as an option: daemons run ``git`` with them, so
``../../etc`` or ``--upload-pack=…`` are refused when a person types them, with
a clear error, rather than by the daemon's git when the task starts.
"""

from __future__ import annotations

import re

_FORBIDDEN = re.compile(r"[\x00-\x20\x7f~^:?*\[\\]|\.\.|@\{|//|/\.|\.lock(/|$)")

RULE = "Not a git branch name: no spaces, '..', '~^:?*[\\', '@{', leading '-' or '.', trailing '/' or '.'."


def is_branch_name(name: str) -> bool:
    return bool(
        name
        and not name.startswith(("-", "/", "."))
        and not name.endswith(("/", "."))
        and name not in ("@", "HEAD")
        and not _FORBIDDEN.search(name)
    )
