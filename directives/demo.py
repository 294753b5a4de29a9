"""The local demo: a small Python package in a bare git repository, and a
directive whose scripted agent plans a diamond of steps on it.

The scripted agent reads its script from ``.makima/script.yaml`` in the
repository, so every worktree the daemon makes carries it. Greet's first
attempt ships a bug that the ``pytest`` verifier catches; the rework fixes it.

A second directive (``REVIEW_DIRECTIVE``, on a repository of its own whose
script is ``REVIEW_SCRIPT``) runs the same plan under guided autonomy, where
Farewell's evaluation is marginal (yellow): it waits for a person to approve
it in the dashboard's inbox.
"""

from __future__ import annotations

import copy
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import yaml

TITLE = "Greet and bid farewell"

DIRECTIVE: dict[str, Any] = {
    "title": TITLE,
    "goal": "Give the greeter package a greet() and a farewell() function, tested and documented.",
    "requirements": [
        "greet('Ada') returns 'Hello, Ada!'",
        "farewell('Ada') returns 'Goodbye, Ada.'",
        "names are stripped of surrounding blanks",
    ],
    "acceptance_criteria": ["python -m pytest passes", "README documents greet() and farewell()"],
    "constraints": ["Standard library only"],
    "agent": "scripted",
    "evaluation_mode": "both",
    "verifiers": ["python -m pytest -q"],
    "base_branch": "main",
}

PACKAGE: dict[str, str] = {
    "README.md": "# greeter\n\nA tiny package that makima's demo directive works on.\n",
    "pyproject.toml": (
        '[project]\nname = "greeter"\nversion = "0.1.0"\n\n'
        '[tool.pytest.ini_options]\ntestpaths = ["tests"]\npythonpath = ["."]\n'
    ),
    "greeter/__init__.py": '"""Greetings for people."""\n',
    "tests/__init__.py": "",
    "tests/test_package.py": "import greeter\n\n\ndef test_the_package_imports():\n    assert greeter.__doc__\n",
}

NAMES = """def clean(name: str) -> str:
    \"\"\"A name without surrounding blanks.\"\"\"
    return name.strip()
"""
NAMES_TEST = """from greeter.names import clean


def test_clean_strips_blanks():
    assert clean("  Ada ") == "Ada"
"""
GREET_BUGGY = """from greeter.names import clean


def greet(name: str) -> str:
    return f"Hello {clean(name)}"
"""
GREET = """from greeter.names import clean


def greet(name: str) -> str:
    return f"Hello, {clean(name)}!"
"""
GREET_TEST = """from greeter.greet import greet


def test_greet():
    assert greet(" Ada ") == "Hello, Ada!"
"""
FAREWELL = """from greeter.names import clean


def farewell(name: str) -> str:
    return f"Goodbye, {clean(name)}."
"""
FAREWELL_TEST = """from greeter.farewell import farewell


def test_farewell():
    assert farewell("Ada ") == "Goodbye, Ada."
"""
README_DONE = PACKAGE["README.md"] + (
    "\n## Usage\n\n```python\n>>> from greeter.greet import greet\n>>> greet('Ada')\n'Hello, Ada!'\n"
    ">>> from greeter.farewell import farewell\n>>> farewell('Ada')\n'Goodbye, Ada.'\n```\n"
)

REVIEW_TITLE = f"{TITLE} (with a review)"

REVIEW_DIRECTIVE: dict[str, Any] = {**DIRECTIVE, "title": REVIEW_TITLE, "autonomy_level": "guided"}

GREEN = {
    "passed": True,
    "overallScore": 0.95,
    "confidenceLevel": "green",
    "criteriaResults": [{"criterion": "python -m pytest passes", "passed": True, "score": 1.0, "evidence": "ran"}],
    "summaryFeedback": "Meets the acceptance criteria.",
    "reworkInstructions": "",
}

SCRIPT: dict[str, Any] = {
    "planning": {
        "via": "batch",
        "steps": [
            {
                "name": "Names",
                "description": "A helper that cleans names.",
                "task_plan": "Add greeter/names.py with clean(name) and a test.",
                "step_type": "implement",
            },
            {
                "name": "Greet",
                "description": "greet(name) says hello.",
                "task_plan": "Add greeter/greet.py with greet(name) and a test.",
                "step_type": "implement",
                "depends_on": ["Names"],
            },
            {
                "name": "Farewell",
                "description": "farewell(name) says goodbye.",
                "task_plan": "Add greeter/farewell.py with farewell(name) and a test.",
                "step_type": "implement",
                "depends_on": ["Names"],
            },
            {
                "name": "Document",
                "description": "The README shows both functions.",
                "task_plan": "Document greet() and farewell() in README.md.",
                "step_type": "document",
                "depends_on": ["Greet", "Farewell"],
            },
        ],
    },
    "steps": {
        "Names": {"write": {"greeter/names.py": NAMES, "tests/test_names.py": NAMES_TEST}},
        "Greet": {
            "attempts": [
                {"write": {"greeter/greet.py": GREET_BUGGY, "tests/test_greet.py": GREET_TEST}},
                {"write": {"greeter/greet.py": GREET}},
            ]
        },
        "Farewell": {"write": {"greeter/farewell.py": FAREWELL, "tests/test_farewell.py": FAREWELL_TEST}},
        "Document": {"write": {"README.md": README_DONE}},
    },
    "evaluations": {"*": GREEN},
    "completion": {"succeed": True},
}


# With the verifiers passing (1.0), the composite score is (0.4 + 1.0) / 2 =
# 0.7: marginal (yellow) under the default thresholds.
YELLOW = {
    "passed": True,
    "overallScore": 0.4,
    "confidenceLevel": "yellow",
    "criteriaResults": [
        {"criterion": "python -m pytest passes", "passed": True, "score": 1.0, "evidence": "ran"},
        {"criterion": "README documents greet() and farewell()", "passed": False, "score": 0.3, "evidence": "not yet"},
    ],
    "summaryFeedback": "farewell() works, but an empty name gives 'Goodbye, .' - a person should decide.",
    "reworkInstructions": "Decide what farewell('') should return and test it.",
}

REVIEW_SCRIPT: dict[str, Any] = {**copy.deepcopy(SCRIPT), "evaluations": {"Farewell": YELLOW, "*": GREEN}}


def paced(script: dict[str, Any], seconds: float) -> dict[str, Any]:
    """``script`` with every execution step taking at least ``seconds``, so that
    a person watching the dashboard sees each step run."""
    script = copy.deepcopy(script)
    if seconds > 0:
        for entry in script["steps"].values():
            entry["sleep"] = seconds
    return script


def _git(*args: str, cwd: Path) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"git {' '.join(args)} failed: {result.stderr.strip()}")
    return result.stdout.strip()


def build_repository(path: Path, *, script: dict[str, Any] | None = None) -> Path:
    """Create the demo's bare repository at ``path`` (``main`` holds the
    package and the agent's ``script``, ``SCRIPT`` by default) unless it
    already exists."""
    path = path.resolve()
    if (path / "HEAD").exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    _git("init", "--quiet", "--bare", "--initial-branch=main", str(path), cwd=path.parent)
    with tempfile.TemporaryDirectory(prefix="makima-demo-") as folder:
        work = Path(folder)
        _git("init", "--quiet", "--initial-branch=main", cwd=work)
        files = {**PACKAGE, ".makima/script.yaml": yaml.safe_dump(script or SCRIPT, sort_keys=False, width=100)}
        for name, content in files.items():
            target = work / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(content)
        _git("add", "-A", cwd=work)
        _git("-c", "user.name=makima", "-c", "user.email=makima@localhost", "commit", "-qm", "greeter 0.1", cwd=work)
        _git("push", "--quiet", str(path), "main", cwd=work)
    return path
