"""Fixtures for the independent Python client.

Stubs are generated from ../../proto with grpcio-tools at session start, so the
test checks the contract as published, not Rust's view of it. The wallet is the
real binary (cargo build --workspace), on a fresh database and a free port.
"""

import json
import os
import pathlib
import subprocess
import sys
import uuid

import pytest

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent.parent
PROTO_ROOT = REPO / "proto"


def _generate_stubs(out_dir: pathlib.Path) -> None:
    import grpc_tools
    from grpc_tools import protoc

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    third_party = PROTO_ROOT / "third_party"
    # Ours only: the vendored google.api protos are imported from their own root
    # (their Python modules come with googleapis-common-protos, a grpcio-status
    # dependency).
    protos = sorted(
        str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.rglob("*.proto") if third_party not in p.parents
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"-I{PROTO_ROOT}",
        f"-I{third_party}",
        f"-I{well_known}",
        f"--python_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        *protos,
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


@pytest.fixture(scope="session")
def stubs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("gen")
    _generate_stubs(out_dir)
    sys.path.insert(0, str(out_dir))
    from flashsale.wallet.v1 import wallet_pb2, wallet_pb2_grpc
    from flashsale.common.v1 import common_pb2

    return {"wallet_pb2": wallet_pb2, "wallet_pb2_grpc": wallet_pb2_grpc, "common_pb2": common_pb2}


def _binary(name: str) -> pathlib.Path:
    target = pathlib.Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    path = target / "debug" / name
    if not path.exists():
        raise RuntimeError(f"{path} missing: run `cargo build --workspace` first")
    return path


@pytest.fixture
def wallet_addr():
    """Starts flashsale-wallet on its own database and a free port; yields host:port."""
    server = os.environ.get("TEST_DATABASE_URL", "postgres://postgres@127.0.0.1:5432").rstrip("/")
    database_url = f"{server}/fs_test_py_{uuid.uuid4().hex}"
    binary = _binary("flashsale-wallet")
    env = {**os.environ, "DATABASE_URL": database_url, "WALLET_LISTEN_ADDR": "127.0.0.1:0",
           # Port 0 for every listener: a running system (deploy/local/run.sh) holds the defaults.
           "METRICS_ADDR": "127.0.0.1:0", "RUST_LOG": "info"}
    subprocess.run([binary, "migrate"], env=env, check=True, stdout=subprocess.DEVNULL)
    proc = subprocess.Popen([binary], env=env, stdout=subprocess.PIPE, text=True)
    try:
        port = None
        for line in proc.stdout:
            event = json.loads(line)
            if event.get("message") == "wallet serving gRPC":
                port = event["port"]
                break
        if port is None:
            raise RuntimeError("wallet exited before serving")
        yield f"127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        subprocess.run(
            ["psql", f"{server}/postgres", "-qc", f'DROP DATABASE IF EXISTS "{database_url.rsplit("/", 1)[1]}" WITH (FORCE)'],
            check=False,
        )
