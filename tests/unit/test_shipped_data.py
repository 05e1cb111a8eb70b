"""The data the product reads ships inside the repository and the installed package; nothing reads a path outside
the repository (a user's clone has no ../shared)."""

import re
import tomllib
from pathlib import Path

from splitwise.replay import load_trace, trace_path

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_THE_REPOSITORY = re.compile(r"\.\./shared|[\"']shared[\"']\s*/|parents\[\d\]\s*/\s*[\"']shared")


def test_the_azure_traces_ship_in_the_splitwise_package_whole_with_their_source_and_licence():
    package = ROOT / "splitwise"
    assert {trace: len(load_trace(trace)) for trace in ("code", "conv")} == {"code": 8819, "conv": 19366}
    for trace in ("code", "conv"):
        assert trace_path(trace).resolve().is_relative_to(package), trace_path(trace)
    readme = (trace_path("conv").parent / "README.md").read_text()
    assert "CC-BY 4.0" in readme and "github.com/Azure/AzurePublicDataset" in readme
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["splitwise"]
    shipped = {path for pattern in package_data for path in package.glob(pattern)}
    assert {trace_path("code"), trace_path("conv"), trace_path("conv").parent / "README.md"} <= shipped


def test_no_project_file_names_a_path_outside_the_repository():
    files = [ROOT / "Makefile", ROOT / "README.md", ROOT / "pyproject.toml"]
    for folder in ("splitwise", "services", "bench", "tests", "docs", "deploy"):
        files += [p for p in (ROOT / folder).rglob("*") if p.suffix in {".py", ".md", ".toml", ".yml", ".yaml"}]
    readers = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
               for path in files if path != Path(__file__).resolve()
               for number, line in enumerate(path.read_text().splitlines(), 1) if OUTSIDE_THE_REPOSITORY.search(line)]
    assert readers == []
