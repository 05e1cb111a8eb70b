"""Generates the Python gRPC stubs in splitwise/rpc/v1 from protos/ (run: python -m splitwise.rpc.generate)."""

from __future__ import annotations

import argparse
import re
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "protos"
STUB_DIR = Path(__file__).resolve().parent / "v1"
PROTO_PACKAGE_DIR = "splitwise/v1"
# protoc names modules after the proto path (splitwise.v1); ours live inside splitwise.rpc.
IMPORT_FROM = re.compile(r"^from splitwise\.v1 import", re.MULTILINE)
IMPORT_TO = "from splitwise.rpc.v1 import"
HEADER = "# Generated from protos/ by `python -m splitwise.rpc.generate`. Do not edit.\n"


def generate(out_dir: Path) -> list[Path]:
    """Writes the stubs for every proto under protos/splitwise/v1 into out_dir; returns their paths."""
    from grpc_tools import protoc

    protos = sorted((PROTO_ROOT / PROTO_PACKAGE_DIR).glob("*.proto"))
    with tempfile.TemporaryDirectory() as tmp:
        args = [
            "grpc_tools.protoc",
            f"-I{PROTO_ROOT}",
            f"--python_out={tmp}",
            f"--pyi_out={tmp}",
            f"--grpc_python_out={tmp}",
            *(str(p.relative_to(PROTO_ROOT)) for p in protos),
        ]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed: {' '.join(args)}")
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for src in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            text = IMPORT_FROM.sub(IMPORT_TO, src.read_text())
            dst = out_dir / src.name
            dst.write_text(HEADER + text)
            written.append(dst)
        init = out_dir / "__init__.py"
        init.write_text('"""Generated gRPC stubs of the splitwise.v1 contract."""\n')
        written.append(init)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=STUB_DIR)
    for path in generate(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
