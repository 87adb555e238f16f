"""Regenerate the Python code of every `protos/*.proto` with the pinned grpcio-tools.

Usage (from anywhere): `python -m protos.generate` writes `protos/<name>_pb2.py` and
`protos/<name>_pb2_grpc.py` next to the sources; `--check` regenerates into a temporary
directory and exits 1 when the committed files differ (stale), 0 when they match.

Why generate with `-I <repo root>` and proto paths `protos/<name>.proto`: protoc then writes
`from protos import agent_pb2` in the `_grpc` module, so the committed code imports as a
normal package module (`from protos import agent_pb2, agent_pb2_grpc`) without touching
`sys.path`. The descriptor pool names the file `protos/agent.proto`; server reflection serves
it under that name. grpcio-tools is a dev dependency, imported only when generating.
"""

from __future__ import annotations

import argparse
import filecmp
import sys
import tempfile
from pathlib import Path

PROTOS_DIR = Path(__file__).resolve().parent
REPO_ROOT = PROTOS_DIR.parent


def proto_sources() -> list[Path]:
    """Every .proto of the package, sorted so generation order is stable."""
    return sorted(PROTOS_DIR.glob("*.proto"))


def generated_names(source: Path) -> list[str]:
    """The files protoc writes for one source, relative to the output root."""
    return [f"protos/{source.stem}_pb2.py", f"protos/{source.stem}_pb2_grpc.py"]


def generate(out_root: Path) -> list[Path]:
    """Run protoc on every source, writing under `out_root/protos/`; the files written."""
    from importlib import resources

    from grpc_tools import protoc

    sources = proto_sources()
    (out_root / "protos").mkdir(parents=True, exist_ok=True)
    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"-I{REPO_ROOT}",
        f"-I{well_known}",
        f"--python_out={out_root}",
        f"--grpc_python_out={out_root}",
        *(str(s.relative_to(REPO_ROOT)) for s in sources),
    ]
    code = protoc.main(args)
    if code != 0:
        raise RuntimeError(f"protoc failed with exit code {code}: {' '.join(args)}")
    return [out_root / name for s in sources for name in generated_names(s)]


def stale_files() -> list[str]:
    """Committed generated files that differ from a fresh generation (or are missing)."""
    with tempfile.TemporaryDirectory() as tmp:
        fresh = generate(Path(tmp))
        stale = []
        for path in fresh:
            rel = path.relative_to(tmp)
            committed = REPO_ROOT / rel
            if not committed.exists() or not filecmp.cmp(path, committed, shallow=False):
                stale.append(str(rel))
        return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m protos.generate",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed generated code is stale"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_files()
        for name in stale:
            print(f"stale: {name} (run python -m protos.generate)", file=sys.stderr)
        return 1 if stale else 0
    for path in generate(REPO_ROOT):
        print(f"wrote {path.relative_to(REPO_ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
