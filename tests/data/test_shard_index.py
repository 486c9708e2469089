"""A shard's index of member offsets: the fast header walk gives tarfile's members for every tar layout tarfile
writes (GNU long names, pax headers, ustar prefixes), hands what it does not read to tarfile, and the cached index
is used only while the shard is unchanged."""

from __future__ import annotations

import io
import os
import tarfile
from pathlib import Path

import pytest
from fixtures import formats as F

from llava_lora.data import shards, tarindex
from llava_lora.data.records import load_data

LONG = "a-folder-whose-name-is-long/" * 4 + "sample-key-longer-than-a-ustar-name-field"  # 153 characters


def _is_text(name: str) -> bool:
    return name.endswith((".txt", ".json"))


def _write(path: Path, fmt: int, pax_headers: dict | None = None) -> Path:
    """Members of every kind: short and long names, non-ASCII, a float mtime (a pax header in PAX_FORMAT), a
    folder, a symlink, a hard link, an empty file, a member over one block."""
    with tarfile.open(path, "w", format=fmt, pax_headers=pax_headers or {}) as tar:
        def add(name: str, data: bytes = b"", kind: bytes = tarfile.REGTYPE, **attrs) -> None:
            info = tarfile.TarInfo(name)
            info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
            for key, value in attrs.items():
                setattr(info, key, value)
            tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)

        add("00000.jpg", os.urandom(700))
        add("00000.txt", b"a short caption", mtime=1_700_000_000.25)
        add(f"{LONG}.jpg", os.urandom(1500))
        add(f"{LONG}.json", b'{"caption": "long"}')
        add("dir", kind=tarfile.DIRTYPE)
        add("dir/link.jpg", kind=tarfile.SYMTYPE, linkname="../00000.jpg")
        add("hard.jpg", kind=tarfile.LNKTYPE, linkname="00000.jpg")
        add("caf\u00e9.txt", "un caf\u00e9".encode())
        add("empty.jpg")
        add("x" * 99 + "/" + "y" * 60 + ".txt", b"ustar prefix")
    return path


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_the_fast_walk_reads_what_tarfile_reads(fmt, tmp_path):
    if fmt == tarfile.USTAR_FORMAT:  # no long names nor non-ASCII there: what ustar holds (its prefix field)
        path = tmp_path / "s.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for name in ("x" * 99 + "/" + "y" * 60 + ".txt", "a" * 150 + "/b.jpg", "c.json"):
                info = tarfile.TarInfo(name)
                info.size = 3
                tar.addfile(info, io.BytesIO(b"abc"))
    else:
        path = _write(tmp_path / "s.tar", fmt)
    expected = tarindex.tarfile_members(path, _is_text)
    assert tarindex._walk(path, _is_text) == expected  # the fast walk itself, not its fallback
    names = [m[0] for m in expected]
    assert (f"{LONG}.jpg" in names and "caf\u00e9.txt" in names) or fmt == tarfile.USTAR_FORMAT
    assert all(m[3] is not None for m in expected if _is_text(m[0])) and "dir/link.jpg" not in names


def test_what_the_fast_walk_does_not_read_goes_to_tarfile(tmp_path):
    glob = _write(tmp_path / "g.tar", tarfile.PAX_FORMAT, pax_headers={"comment": "a global header"})
    with pytest.raises(tarindex._Unusual):
        tarindex._walk(glob, _is_text)
    assert tarindex.members(glob, _is_text) == tarindex.tarfile_members(glob, _is_text)
    # a shard cut in the middle of a header: tarfile's reading of it, whatever that is
    whole = _write(tmp_path / "w.tar", tarfile.PAX_FORMAT).read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(whole[:512 * 7 + 100])
    assert tarindex.members(cut, _is_text) == tarindex.tarfile_members(cut, _is_text)
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar at all" * 100)
    with pytest.raises(tarfile.TarError):
        tarindex.members(junk, _is_text)


def test_a_shards_index_is_cached_until_the_shard_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAVA_LORA_CACHE", str(tmp_path / "cache"))
    items = F.sample_items(6)
    pattern = F.write_shards(tmp_path / "sh", items, per_shard=6)
    first = load_data(pattern)
    assert len(list((tmp_path / "cache" / "shard-index").glob("*.json"))) == 1

    def no_walk(*_):
        raise AssertionError("the shard was walked again")

    with monkeypatch.context() as m:
        m.setattr(tarindex, "members", no_walk)
        assert load_data(pattern).records == first.records  # offsets and texts from the cache

    # the shard rewritten with other samples: its size and mtime differ, the entry is not used
    F.write_shards(tmp_path / "sh", items[3:] + items[:3], per_shard=6)
    again = load_data(pattern)
    assert [r.turns for r in again.records] == [r.turns for r in first.records[3:] + first.records[:3]]
    # the same size, only the mtime changed: walked again too
    shard = tmp_path / "sh" / "00000.tar"
    st = shard.stat()
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    walked = []
    monkeypatch.setattr(tarindex, "members", lambda *a, **kw: walked.append(1) or tarindex.tarfile_members(*a, **kw))
    assert load_data(pattern).records == again.records and walked == [1]


def test_an_unwritable_or_disabled_cache_only_costs_the_walk(tmp_path, monkeypatch):
    pattern = F.write_shards(tmp_path / "sh", F.sample_items(4), per_shard=4)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LLAVA_LORA_CACHE", str(blocker / "cache"))  # cannot be made: a file stands there
    assert len(load_data(pattern).records) == 4
    monkeypatch.setenv("LLAVA_LORA_CACHE", "off")
    assert tarindex.cache_dir() is None and len(load_data(pattern).records) == 4
    assert shards.shard_files(str(pattern)) == [tmp_path / "sh" / "00000.tar"]
    assert sorted(p.name for p in (tmp_path / "sh").iterdir()) == ["00000.tar"]  # nothing beside the shards
