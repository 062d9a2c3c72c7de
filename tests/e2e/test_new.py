"""``orchestrator new``: what it writes, and the one line it says instead when it cannot."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support.process import run


def test_it_writes_a_plugin_distribution_and_says_what_next(tmp_path: Path) -> None:
    """NAME/ holds the pyproject (three functions, the integration's defaults, a test extra), the package, its
    tests and a README; stdout lists the files and the next commands."""
    result = run("new", "orchestrator-acme", "--integration", "acme", cwd=tmp_path)
    assert result.code == 0, str(result)
    root = tmp_path / "orchestrator-acme"
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()) == [
        ".gitignore",
        "README.md",
        "pyproject.toml",
        "src/orchestrator_acme/__init__.py",
        "src/orchestrator_acme/functions.py",
        "tests/test_functions.py",
    ]
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "orchestrator-acme"
    assert project["project"]["entry-points"]["orchestrator.functions"] == {
        "check-credentials": "orchestrator_acme.functions:check_credentials",
        "register-webhook": "orchestrator_acme.functions:register_webhook",
        "delete-webhook": "orchestrator_acme.functions:delete_webhook",
    }
    assert project["project"]["entry-points"]["orchestrator.integrations"] == {"acme": "orchestrator_acme:INTEGRATION"}
    assert project["project"]["optional-dependencies"]["test"] == ["pytest>=8"]
    assert "integration=INTEGRATION" in (root / "src/orchestrator_acme/functions.py").read_text()
    assert result.out.splitlines()[0] == "created orchestrator-acme/, a plugin for integration acme:"
    assert "  pip install -e 'orchestrator-acme[test]'   # into the orchestrator's environment" in result.out


@pytest.mark.parametrize(
    ("name", "integration", "says"),
    [
        ("Orchestrator_Acme", "acme", "NAME 'Orchestrator_Acme' is not a plugin distribution name: lower-case"),
        ("acme--x", "acme", "NAME 'acme--x' is not a plugin distribution name"),
        ("orchestrator", "acme", "NAME 'orchestrator' would make the package orchestrator, which shadows another"),
        ("json", "acme", "NAME 'json' would make the package json, which shadows another: try orchestrator-json"),
        ("class", "acme", "NAME 'class' would make the package class, a Python keyword: try orchestrator-class"),
        ("orchestrator-acme", "Acme Corp", "--integration 'Acme Corp' is invalid: use 1 to 63 characters"),
    ],
)
def test_a_bad_name_is_one_line_and_writes_nothing(tmp_path: Path, name: str, integration: str, says: str) -> None:
    """A name that cannot be a distribution, a package or an integration: one line on stderr, exit 1, no file."""
    result = run("new", name, "-i", integration, cwd=tmp_path)
    assert result.code == 1, str(result)
    assert result.err.startswith(f"orchestrator: error: {says}"), str(result)
    assert len(result.err.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_existing_directory_is_refused_and_left_alone(tmp_path: Path) -> None:
    """NAME exists (even empty): refused in one line, and what is there is untouched."""
    (tmp_path / "orchestrator-acme").mkdir()
    (tmp_path / "orchestrator-acme" / "notes.txt").write_text("mine")
    result = run("new", "orchestrator-acme", "-i", "acme", cwd=tmp_path)
    assert result.code == 1, str(result)
    assert result.err == (
        "orchestrator: error: orchestrator-acme already exists: choose another NAME, or move it away first\n"
    )
    assert [p.name for p in (tmp_path / "orchestrator-acme").iterdir()] == ["notes.txt"]


def test_json_names_the_files(tmp_path: Path) -> None:
    """--json: one document with the directory, the integration, the files written and the functions."""
    result = run("new", "orchestrator-acme", "-i", "acme", "--json", cwd=tmp_path)
    assert result.code == 0, str(result)
    data = result.json()
    assert (data["directory"], data["integration"]) == ("orchestrator-acme", "acme")
    assert data["functions"] == ["check-credentials", "register-webhook", "delete-webhook"]
    assert "orchestrator-acme/tests/test_functions.py" in data["files"]


def test_the_integration_is_required(tmp_path: Path) -> None:
    """Without --integration: click's usage error (exit 2) naming it."""
    result = run("new", "orchestrator-acme", cwd=tmp_path)
    assert result.code == 2, str(result)
    assert "Missing option '-i' / '--integration'" in result.err
