"""Safe extraction against hostile archives: each is built here, and nothing outside the target
may change (the folder around the target is snapshotted before and compared after)."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile
from pathlib import Path

import pytest
from archive_builders import hostile_tar, tar_archive, zip_archive

from adcore.data.extract import ArchiveError, ExtractionLimits, UnsafeArchiveError, safe_extract


def _snapshot(folder: Path) -> dict[str, bytes | str]:
    """Every path under ``folder`` (links not followed) with its content or link target."""
    state: dict[str, bytes | str] = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            state[key] = "-> " + os.readlink(path)
        elif path.is_file():
            state[key] = path.read_bytes()
        else:
            state[key] = "dir"
    return state


@pytest.fixture()
def box(tmp_path: Path) -> Path:
    """A folder with a victim file beside the extraction target (and the archives)."""
    (tmp_path / "victim.txt").write_text("precious")
    (tmp_path / "target").mkdir()
    return tmp_path


def _refused(box: Path, archive: Path, match: str) -> None:
    before = {k: v for k, v in _snapshot(box).items() if not k.startswith("target")}
    with pytest.raises(UnsafeArchiveError, match=match):
        safe_extract(archive, box / "target")
    after = {k: v for k, v in _snapshot(box).items() if not k.startswith("target")}
    assert after == before  # nothing outside the target changed
    assert not any(p.is_symlink() for p in (box / "target").rglob("*"))


@pytest.mark.parametrize("name", ["../evil.txt", "/abs/evil.txt", "a/../../evil.txt",
                                  "C:/evil.txt", "..\\evil.txt"])
def test_member_names_escaping_are_refused(box: Path, name: str) -> None:
    _refused(box, tar_archive(box / "bad.tar.gz", {"ok.txt": b"ok", name: b"x"}),
             "absolute path|contains '..'")
    _refused(box, zip_archive(box / "bad.zip", {"ok.txt": b"ok", name: b"x"}),
             "absolute path|contains '..'")
    assert not (box / "target" / "ok.txt").exists()  # tar: refused before anything is written


@pytest.mark.parametrize("link", ["/etc/passwd", "../victim.txt", "sub/../../victim.txt", ""])
def test_symlinks_out_of_target_are_refused(box: Path, link: str) -> None:
    _refused(box, hostile_tar(box / "l.tar", [("sym", "link", link), ("file", "link", b"x")]),
             "link 'link'")


def test_member_through_a_link_member_is_refused(box: Path) -> None:
    # the link itself stays inside; writing through it is what is refused
    archive = hostile_tar(box / "t.tar", [("dir", "sub", None), ("sym", "alias", "sub"),
                                          ("file", "alias/x.txt", b"x")])
    _refused(box, archive, "runs through the link member 'alias'")


def test_nested_symlink_chain_deeper_than_path_max_is_refused(box: Path) -> None:
    """The shape of CVE-2025-4517: a chain of links whose resolved path exceeds PATH_MAX, so
    ``os.path.realpath`` stops resolving and a final link climbs out of the target."""
    component = "d" * 247
    steps = "abcdefghijklmnop"
    entries: list[tuple[str, str, object]] = []
    path = ""
    for step in steps:
        entries.append(("dir", os.path.join(path, component), None))
        entries.append(("sym", os.path.join(path, step), component))
        path = os.path.join(path, component)
    link_path = os.path.join(*steps, "l" * 254)
    entries.append(("sym", link_path, os.path.join(*[".."] * len(steps))))
    entries.append(("sym", "escape", os.path.join(link_path, "..", "..")))
    entries.append(("file", "escape/victim.txt", b"overwritten"))
    entries.append(("file", "escape/created.txt", b"created"))
    _refused(box, hostile_tar(box / "chain.tar", entries), "contains '..'|runs through")
    assert (box / "victim.txt").read_text() == "precious" and not (box / "created.txt").exists()


def test_chain_of_inside_links_cannot_be_written_through(box: Path) -> None:
    entries: list[tuple[str, str, object]] = [("dir", "real", None), ("sym", "a", "real"),
                                              ("sym", "b", "a"), ("file", "b/x.txt", b"x")]
    _refused(box, hostile_tar(box / "inside.tar", entries), "runs through the link member 'b'")


def test_hard_links_resolve_from_the_archive_root(box: Path) -> None:
    archive = hostile_tar(box / "h.tar", [("file", "sub/data.txt", b"payload"),
                                          ("hard", "other/copy.txt", "sub/data.txt")])
    safe_extract(archive, box / "target")
    copy = box / "target" / "other" / "copy.txt"
    assert copy.read_bytes() == b"payload"
    assert os.stat(copy).st_ino != os.stat(box / "target" / "sub" / "data.txt").st_ino  # a copy
    # relative to the member's own folder ("sub/data.txt" from "other/") it would not exist:
    for target, match in (("../victim.txt", "contains '..'"), ("/etc/passwd", "absolute"),
                          ("data.txt", "does not name a regular file")):
        _refused(box, hostile_tar(box / "h2.tar", [("file", "sub/data.txt", b"p"),
                                                   ("hard", "sub/link", target)]), match)


def test_special_members_are_refused(box: Path) -> None:
    _refused(box, hostile_tar(box / "f.tar", [("fifo", "pipe", None)]), "FIFO file")
    _refused(box, hostile_tar(box / "c.tar", [("chr", "null", None)]), "device file")


def test_plain_dot_archives_are_accepted(box: Path) -> None:
    source = box / "src"
    (source / "inner").mkdir(parents=True)
    (source / "inner" / "a.txt").write_text("a")
    (source / "top.txt").write_text("t")
    archive = box / "dot.tar"
    with tarfile.open(archive, "w") as tf:
        tf.add(source, arcname=".")  # what `tar -C src .` writes: "./", "./inner", ...
    assert tarfile.open(archive).getnames()[0] == "."
    safe_extract(archive, box / "target")
    assert (box / "target" / "inner" / "a.txt").read_text() == "a"
    assert (box / "target" / "top.txt").read_text() == "t"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("./z/b.txt", b"b")
    (box / "dot.zip").write_bytes(buffer.getvalue())
    safe_extract(box / "dot.zip", box / "target2")
    assert (box / "target2" / "z" / "b.txt").read_bytes() == b"b"


def test_size_and_member_caps(box: Path) -> None:
    archive = tar_archive(box / "big.tar.gz", {"big.bin": bytes(200_000)})
    with pytest.raises(UnsafeArchiveError, match="more than 100000 bytes"):
        safe_extract(archive, box / "target", ExtractionLimits(max_bytes=100_000))
    assert not (box / "target" / "big.bin").exists()
    bomb = zip_archive(box / "bomb.zip", {"zeros.bin": bytes(300_000)})
    with pytest.raises(UnsafeArchiveError, match="expected at most 100000"):
        safe_extract(bomb, box / "target", ExtractionLimits(max_bytes=100_000))
    many = tar_archive(box / "many.tar", {f"{i}.txt": b"x" for i in range(30)}, mode="w")
    with pytest.raises(UnsafeArchiveError, match="holds 30 members; expected at most 20"):
        safe_extract(many, box / "target", ExtractionLimits(max_members=20))


def test_lying_zip_sizes_are_counted_as_written(box: Path) -> None:
    archive = zip_archive(box / "liar.zip", {"a.bin": bytes(50_000)})
    data = bytearray(archive.read_bytes())
    # forge the central directory's uncompressed size of the member to 10 bytes
    central = data.rfind(b"PK\x01\x02")
    data[central + 24:central + 28] = (10).to_bytes(4, "little")
    archive.write_bytes(bytes(data))
    with pytest.raises(ArchiveError):
        safe_extract(archive, box / "target", ExtractionLimits(max_bytes=20_000))


def test_damaged_and_foreign_files(box: Path) -> None:
    (box / "notes.txt").write_text("not an archive")
    with pytest.raises(ArchiveError, match="notes.txt is neither a tar nor a zip"):
        safe_extract(box / "notes.txt", box / "target")
    whole = tar_archive(box / "whole.tar.gz", {"a.bin": os.urandom(100_000)}).read_bytes()
    (box / "cut.tar.gz").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ArchiveError, match="cut.tar.gz is damaged or truncated"):
        safe_extract(box / "cut.tar.gz", box / "target")
    with pytest.raises(FileNotFoundError, match="no archive at"):
        safe_extract(box / "absent.zip", box / "target")
