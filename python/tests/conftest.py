"""Shared helpers: the CLI to compare against, fixtures, QEMU's tools.

The Rust test `tests/python.rs` (run by `cargo test`) builds the extension
into a scratch virtual environment and runs these tests with
QCOW2_BITMAP_BIN pointing at the CLI it built. A missing QEMU tool skips the
test that needs it, visibly, unless QCOW2_BITMAP_REQUIRE_QEMU=1 (CI), which
makes it a failure.
"""

import json
import os
import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "fixtures"
REQUIRE_QEMU = os.environ.get("QCOW2_BITMAP_REQUIRE_QEMU") == "1"


def _find_cli():
    env = os.environ.get("QCOW2_BITMAP_BIN")
    if env:
        return env
    for profile in ("debug", "release"):
        p = ROOT / "target" / profile / "qcow2-bitmap"
        if p.exists():
            return str(p)
    return None


CLI_BIN = _find_cli()


def need_tool(name):
    """Skips (or, in CI, fails) the calling test when `name` is missing."""
    if shutil.which(name):
        return
    msg = f"{name} not found (Debian: qemu-utils / libnbd-bin)"
    if REQUIRE_QEMU:
        pytest.fail(f"{msg}, and QCOW2_BITMAP_REQUIRE_QEMU=1")
    pytest.skip(f"SKIPPED: {msg}")


class Cli:
    """Runs the qcow2-bitmap CLI."""

    def __init__(self, path):
        self.path = path

    def run(self, *args, cwd=None, check=True):
        r = subprocess.run(
            [self.path, *map(str, args)], cwd=cwd, capture_output=True, text=True
        )
        if check and r.returncode != 0:
            raise AssertionError(
                f"qcow2-bitmap {' '.join(map(str, args))} exited {r.returncode}: {r.stderr}"
            )
        return r

    def json(self, *args, cwd=None, check=True):
        r = self.run(*args, cwd=cwd, check=check)
        return json.loads(r.stdout)


@pytest.fixture(scope="session")
def cli():
    if CLI_BIN is None:
        pytest.fail("the qcow2-bitmap CLI is not built: run `cargo build` (or set QCOW2_BITMAP_BIN)")
    return Cli(CLI_BIN)


def run(*args, cwd=None, check=True, input=None):
    r = subprocess.run(
        [*map(str, args)], cwd=cwd, capture_output=True, text=True, input=input
    )
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {r.returncode}: {r.stderr}")
    return r


def copy(src, dst):
    """A byte-exact copy (no holes punched, no reflink surprises)."""
    with open(src, "rb") as f, open(dst, "wb") as g:
        shutil.copyfileobj(f, g, 1 << 20)
    return dst
