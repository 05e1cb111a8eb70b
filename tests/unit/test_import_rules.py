"""Import rules: the core (`splitwise/`) never imports the services or the benchmarks, and the client library
never loads server code."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "splitwise"
SERVER_MODULES = ("splitwise.server", "services")


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at its top or inside a function."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def test_the_core_never_imports_the_services_or_the_benchmarks():
    broken = sorted(f"{path.relative_to(ROOT)} imports {name}"
                    for path in CORE.rglob("*.py") if "/rpc/v1/" not in path.as_posix()
                    for name in imported_modules(path) if name.split(".")[0] in ("services", "bench"))
    assert not broken, "\n".join(broken)


def test_the_client_loads_no_server_code():
    probe = ("import sys, splitwise.client; "
             "print('\\n'.join(m for m in sys.modules if m == 'splitwise.server' or m.split('.')[0] == 'services'))")
    loaded = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "", f"importing splitwise.client loads: {loaded.stdout.split()}"


def test_the_rule_sees_an_import_inside_a_function(tmp_path):
    sample = tmp_path / "sample.py"
    sample.write_text("def f():\n    from bench.replay import run\n    import services.scheduler\n")
    assert imported_modules(sample) == {"bench.replay", "services.scheduler"}
