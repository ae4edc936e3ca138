"""Generate serving/proto/ from the .proto files in protos/: `python protos/generate.py [OUT_DIR]`.

protoc writes imports relative to protos/ (`from inference import ...`); they are rewritten to
`serving.proto.` so the generated code lives inside the package. tests/test_serving_proto.py
regenerates into a temporary directory and checks the result matches serving/proto byte for byte.
"""

import re
import sys
from pathlib import Path

from grpc_tools import protoc

PROTO_ROOT = Path(__file__).resolve().parent
DEFAULT_OUT = PROTO_ROOT.parent / "serving" / "proto"
IMPORT = re.compile(r"^from (inference|mnist\.v1) import ", re.MULTILINE)


def proto_files() -> list[Path]:
    return sorted(PROTO_ROOT.rglob("*.proto"))


def generate(out_dir: Path = DEFAULT_OUT) -> list[Path]:
    """Compile every .proto into out_dir; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    include = str(Path(protoc.__file__).parent / "_proto")  # well-known types shipped with grpc_tools
    sources = [str(p.relative_to(PROTO_ROOT)) for p in proto_files()]
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={out_dir}", f"--pyi_out={out_dir}"]
    args += [f"--grpc_python_out={out_dir}", *sources]
    if protoc.main(args) != 0:
        raise SystemExit(f"protoc failed on {sources}")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix in (".py", ".pyi"):
            path.write_text(IMPORT.sub(r"from serving.proto.\1 import ", path.read_text()))
            written.append(path)
    for package in sorted({p.parent for p in written} | {out_dir}):
        while package != out_dir.parent:
            init = package / "__init__.py"
            if not init.exists():
                init.write_text("")
                written.append(init)
            package = package.parent
    return sorted(set(written))


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_OUT
    for written_file in generate(target):
        print(written_file)
