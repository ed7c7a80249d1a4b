"""Every read of the bindings gives the CLI's answer (its --json documents)."""

import hashlib
import json

import pytest

import qcow2_bitmap as qb
from conftest import FIXTURES

IMAGES = sorted(p.name for p in FIXTURES.glob("*.qcow2"))


def test_fixture_list_is_not_empty():
    assert "demo.qcow2" in IMAGES and len(IMAGES) >= 15


@pytest.mark.parametrize("name", IMAGES)
def test_info_and_bitmaps_match_cli(cli, name):
    path = str(FIXTURES / name)
    want = cli.json("info", "--json", path)
    with qb.open(path) as img:
        assert img.info() == want
        assert list(img.info()) == list(want), "keys in the CLI's order"
        assert img.virtual_size == want["virtual-size"]
        assert img.cluster_size == want["cluster-size"]
        assert img.version == want["version"]
        rows = want["bitmaps"]
        got = img.bitmaps
        assert [b.name for b in got] == [r["name"] for r in rows]
        for b, r in zip(got, rows):
            assert b.granularity == r["granularity"]
            assert b.flags == r["flags"]
            assert b.enabled == ("auto" in r["flags"])
            assert b.state == r["state"]
            assert b.problem == r.get("problem")
            assert b.dirty_bytes == r["dirty-bytes"]
            assert b.table_offset == r["table-offset"]
            assert b.table_size == r["table-size"]


@pytest.mark.parametrize("name", IMAGES)
def test_check_matches_cli(cli, name):
    path = str(FIXTURES / name)
    want = cli.json("check", "--json", path, check=False)
    with qb.open(path) as img:
        assert img.check() == want


@pytest.mark.parametrize("name", IMAGES)
def test_extents_and_hash_match_cli(cli, name):
    path = str(FIXTURES / name)
    compared = 0
    with qb.open(path) as img:
        for b in img.bitmaps:
            if b.state != "ok":
                # The CLI's refusal, as an exception with the same one line.
                r = cli.run("extents", path, b.name, check=False)
                assert r.returncode == 1
                with pytest.raises((qb.UntrustedBitmapError, qb.CorruptImageError)) as e:
                    list(img.extents(b.name))
                assert f"qcow2-bitmap: {e.value}" == r.stderr.strip()
                continue
            for all_ in (False, True):
                args = ["extents", "--json"] + (["--all"] if all_ else []) + [path, b.name]
                want = [(e["offset"], e["length"], e["dirty"]) for e in cli.json(*args)]
                assert list(img.extents(b.name, all=all_)) == want, (b.name, all_)
            assert img.hash(b.name) == cli.run("hash", path, b.name).stdout.strip()
            compared += 1
    assert compared == sum(1 for b in qb.open(path).bitmaps if b.state == "ok")


def test_extents_ranges_match_cli(cli):
    path = str(FIXTURES / "demo.qcow2")
    with qb.open(path) as img:
        size = img.virtual_size
        for off, length in [(0, 1 << 20), (90177536 - 100, 70000), (size - 65536, 65536), (123, 0)]:
            for all_ in (False, True):
                args = ["extents", "--json", "--offset", off, "--length", length]
                args += ["--all"] if all_ else []
                want = [(e["offset"], e["length"], e["dirty"]) for e in cli.json(*args, path, "ckpt-2")]
                got = list(img.extents("ckpt-2", offset=off, length=length, all=all_))
                assert got == want, (off, length, all_)
        with pytest.raises(qb.InvalidInputError):
            img.extents("ckpt-2", offset=size, length=1)


def test_extents_iterate_lazily_across_batches(cli):
    # since-ckpt-1 has more extents than one batch? Use the densest bitmap and
    # check laziness: the first item comes before the rest are computed.
    path = str(FIXTURES / "demo.qcow2")
    want = [(e["offset"], e["length"], e["dirty"]) for e in cli.json("extents", "--json", "--all", path, "ckpt-3")]
    with qb.open(path) as img:
        it = img.extents("ckpt-3", all=True)
        assert next(it) == want[0]
        assert [next(it) for _ in range(min(5, len(want) - 1))] == want[1:6]
        assert list(it) == want[6:]
        assert list(it) == []


def guest_cases():
    index = json.loads((FIXTURES / "guest" / "expected" / "index.json").read_text())
    return [c for c in index]


def case_ok(c):
    return c.get("expect-error") is None


@pytest.mark.parametrize("case", guest_cases(), ids=lambda c: c["name"])
def test_map_and_read_match_cli_and_qemu(cli, case, monkeypatch):
    cwd = FIXTURES / "guest" / case["cwd"]
    monkeypatch.chdir(cwd)
    top = case["top-from-cwd"]
    if not case_ok(case):
        r = cli.run("map", "--json", top, cwd=cwd, check=False)
        assert r.returncode == 1
        with pytest.raises(qb.Qcow2BitmapError) as e:
            with qb.open(top) as img:
                list(img.map())
        assert str(e.value) in r.stderr
        return
    want = cli.json("map", "--json", top, cwd=cwd)
    with qb.open(top) as img:
        assert list(img.map()) == want
        chain = img.backing_chain
        assert chain[0]["virtual-size"] == case["virtual-size"]
        assert len(chain) == case["layers"]
        size = chain[0]["virtual-size"]
        expected = FIXTURES / "guest" / "expected" / case["name"]
        if (expected / "raw-ranges.json").exists():
            for r in json.loads((expected / "raw-ranges.json").read_text()):
                data = img.read(r["start"], r["length"])
                assert hashlib.sha256(data).hexdigest() == r["sha256"]
            return
        h = hashlib.sha256()
        pos = 0
        step = 3 << 20  # not a multiple of any cluster size: reads straddle clusters
        while pos < size:
            n = min(step, size - pos)
            h.update(img.read(pos, n))
            pos += n
        want_sha = (expected / "raw.sha256").read_text().split()[0]
        assert h.hexdigest() == want_sha, "guest bytes differ from qemu-img convert -O raw"


def test_map_ranges_match_cli(cli):
    path = str(FIXTURES / "guest" / "cs64k.qcow2")
    with qb.open(path) as img:
        for off, length in [(1000, 70000), (4194204, 100), (0, 1)]:
            want = cli.json("map", "--json", "--offset", off, "--length", length, path)
            assert list(img.map(offset=off, length=length)) == want
        with pytest.raises(qb.InvalidInputError):
            img.map(offset=4194301, length=100)


def test_read_refuses_bad_ranges():
    with qb.open(str(FIXTURES / "guest" / "cs64k.qcow2")) as img:
        size = img.virtual_size
        assert img.read(size - 10, 10) == img.read(size - 10, 10)
        assert img.read(size, 0) == b""
        with pytest.raises(qb.InvalidInputError):
            img.read(size - 10, 11)
        with pytest.raises(qb.InvalidInputError):
            img.read(2**64 - 1, 2)
        with pytest.raises(OverflowError):
            img.read(-1, 1)


def test_closed_image_refuses_everything():
    img = qb.open(str(FIXTURES / "demo.qcow2"))
    it = img.extents("ckpt-1")
    img.close()
    assert img.closed
    img.close()  # idempotent
    with pytest.raises(qb.ClosedError):
        img.virtual_size
    with pytest.raises(qb.ClosedError):
        next(it)
    assert "closed" in repr(img)
