"""Generate the Python code of protos/ into service/api/gen/ (`make protos`; `--check` for staleness).

protoc names imports after the proto package (`from loraserve.v1 import x_pb2`), which only resolves
with the generated root on sys.path. We keep the proto file names as they are (`loraserve/v1/...`, what
reflection clients see) and rewrite those imports to the package path instead.
"""

from __future__ import annotations

import argparse
import filecmp
import re
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO / "protos"
GEN_DIR = Path(__file__).resolve().parent / "gen"
GEN_PACKAGE = "service.api.gen"

_IMPORT_RE = re.compile(r"^from loraserve(\.v\d+)? import ", re.MULTILINE)
# Where the generator stamps its own version: a newer grpcio-tools changes these, not the API.
_VERSION_STAMPS = (
    re.compile(r"^# Protobuf Python Version: .*$", re.MULTILINE),
    re.compile(r"^GRPC_GENERATED_VERSION = .*$", re.MULTILINE),
    re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)\s*\d+,\s*\d+,\s*\d+,"),
)


def proto_files(proto_root: Path = PROTO_ROOT) -> list[Path]:
    return sorted(p.relative_to(proto_root) for p in proto_root.rglob("*.proto"))


def generate(out_dir: Path, proto_root: Path = PROTO_ROOT) -> list[Path]:
    """Run protoc on every proto under proto_root into out_dir; returns the files written."""
    from grpc_tools import protoc  # a build-time tool: imported only when generating

    out_dir.mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    protos = [str(p) for p in proto_files(proto_root)]
    if not protos:
        raise FileNotFoundError(f"no .proto files under {proto_root}")
    args = ["grpc_tools.protoc", f"-I{proto_root}", f"-I{well_known}", f"--python_out={out_dir}",
            f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}", *protos]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(protos)} (see its messages above)")
    written = []
    for path in sorted(out_dir.rglob("*.py*")):
        if path.suffix not in (".py", ".pyi"):
            continue
        text = path.read_text()
        fixed = _IMPORT_RE.sub(lambda m: f"from {GEN_PACKAGE}.loraserve{m.group(1) or ''} import ", text)
        if fixed != text:
            path.write_text(fixed)
        written.append(path)
    for pkg in {p.parent for p in written} | {out_dir / "loraserve"}:
        init = pkg / "__init__.py"
        while pkg != out_dir and not init.exists():
            init.write_text("")
            written.append(init)
            pkg = pkg.parent
            init = pkg / "__init__.py"
    return sorted(set(written))


def _normalized(path: Path) -> str:
    text = path.read_text()
    for stamp in _VERSION_STAMPS:
        text = stamp.sub(lambda m: m.group(1) if m.groups() else "", text)
    return text


def stale_files(gen_dir: Path = GEN_DIR, proto_root: Path = PROTO_ROOT) -> list[str]:
    """Generated files that differ from a fresh generation (or are missing / extra), as relative paths."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = Path(tmp)
        generate(fresh, proto_root)
        want = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file() and "__pycache__" not in p.parts}
        have = {p.relative_to(gen_dir) for p in gen_dir.rglob("*") if p.is_file() and "__pycache__" not in p.parts
                and p.parent != gen_dir}  # gen/__init__.py is ours, not protoc's
        stale = sorted(str(p) for p in want ^ have)
        for rel in sorted(want & have):
            if not filecmp.cmp(fresh / rel, gen_dir / rel, shallow=False) and \
                    _normalized(fresh / rel) != _normalized(gen_dir / rel):
                stale.append(str(rel))
        return sorted(stale)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m service.api.protogen", description=__doc__)
    p.add_argument("--check", action="store_true", help="exit 1 if the committed code is stale, write nothing")
    args = p.parse_args(argv)
    if args.check:
        stale = stale_files()
        if stale:
            print("stale generated code (run `make protos`): " + ", ".join(stale), file=sys.stderr)
            return 1
        return 0
    target = GEN_DIR / "loraserve"
    with tempfile.TemporaryDirectory() as tmp:  # generate aside, then swap: no half-written tree
        files = generate(Path(tmp))
        shutil.rmtree(target, ignore_errors=True)
        for f in files:
            dest = GEN_DIR / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())
    print(f"generated {len(files)} files under {GEN_DIR}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
