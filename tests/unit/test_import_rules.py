"""Import rules: the core (`splitwise/`) never imports the services or the benchmarks, and the client library
never loads server code; and no RPC handler is longer than a screen."""

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


MAX_HANDLER_LINES = 60


def rpc_names() -> set[str]:
    from splitwise.rpc.v1 import kv_store_pb2, scheduler_pb2, worker_pb2

    return {method.name for module in (kv_store_pb2, scheduler_pb2, worker_pb2)
            for service in module.DESCRIPTOR.services_by_name.values() for method in service.methods}


def test_no_rpc_handler_is_longer_than_a_screen():
    """A handler reads as its request's states, each a method of its own (issue 18): none over 60 lines."""
    names = rpc_names()
    assert {"Generate", "Prefill", "Decode", "PushKV", "Put", "Get", "Calls"} <= names
    long = []
    for path in (ROOT / "services").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in names:
                        lines = item.end_lineno - item.lineno + 1
                        if lines > MAX_HANDLER_LINES:
                            long.append(f"{path.relative_to(ROOT)}: {node.name}.{item.name}, {lines} lines")
    assert not long, long
