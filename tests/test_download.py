"""`knnlm data`: a fake WikiText archive served from 127.0.0.1 (no network), its checksums patched in."""

import dataclasses
import functools
import hashlib
import http.server
import os
import pathlib
import socket
import stat
import tempfile
import threading
import zipfile
from types import SimpleNamespace

import pytest
from hypothesis import given, settings, strategies as st

from conftest import REPO, fails, snapshot
from knnlm import download
from knnlm.cli import main

TEXTS = {"wiki.train.tokens": b" = Title = \n the cat sat on the mat \n",
         "wiki.valid.tokens": b" the dog sat \n",
         "wiki.test.tokens": b" the cat ran \n"}
SUMS = REPO.parent / "shared" / "data" / "wikitext-2" / "SHA256SUMS"


def make_zip(path, members):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


def wikitext(folder="wikitext-2", **changed):
    return {f"{folder}/{name}": changed.get(name.replace(".", "_"), data) for name, data in TEXTS.items()}


@pytest.fixture
def server(tmp_path, monkeypatch):
    """Serves tmp_path/srv at the returned base URL; wikitext-2's pinned checksums become the fake files'."""
    srv = tmp_path / "srv"
    srv.mkdir()
    make_zip(srv / "wikitext-2-v1.zip", wikitext())
    fake = {name: hashlib.sha256(data).hexdigest() for name, data in TEXTS.items()}
    wt2 = dataclasses.replace(download.CORPORA["wikitext-2"], sha256=fake)
    monkeypatch.setitem(download.CORPORA, "wikitext-2", wt2)
    monkeypatch.delenv("KNNLM_DATA_URL", raising=False)

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(srv)))
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield SimpleNamespace(url=f"http://127.0.0.1:{httpd.server_address[1]}", srv=srv)
    httpd.shutdown()
    httpd.server_close()


def knnlm_data(capsys, *args):
    """`knnlm data ...` in-process, as a finished process (exit status, stdout, stderr)."""
    code = main(["data", *map(str, args)])
    out, err = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=out, stderr=err)


def test_download_verify_unpack_then_rerun_does_nothing(server, tmp_path, capsys):
    dest = tmp_path / "out" / "wikitext-2"
    proc = knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    assert {p.name: p.read_bytes() for p in dest.iterdir()} == TEXTS
    assert [p.name for p in dest.parent.iterdir()] == ["wikitext-2"]  # no temporary file or folder left
    assert "SHA-256 verified" in proc.stdout and f"export KNNLM_DATA={dest.resolve()}" in proc.stdout

    before = {p.name: p.stat().st_mtime_ns for p in dest.iterdir()}
    proc = knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", server.url + "/gone.zip")  # not even fetched
    assert proc.returncode == 0 and "nothing to do" in proc.stdout
    assert {p.name: p.stat().st_mtime_ns for p in dest.iterdir()} == before


def test_url_from_environment_and_full_archive_url(server, tmp_path, capsys, monkeypatch):
    (server.srv / "mirror.zip").write_bytes((server.srv / "wikitext-2-v1.zip").read_bytes())
    proc = knnlm_data(capsys, "wikitext-2", "--dest", tmp_path / "a", "--url", server.url + "/mirror.zip")
    assert proc.returncode == 0, proc.stderr
    monkeypatch.setenv("KNNLM_DATA_URL", server.url + "/")
    assert knnlm_data(capsys, "wikitext-2", "--dest", tmp_path / "b").returncode == 0
    assert (tmp_path / "b" / "wiki.test.tokens").read_bytes() == TEXTS["wiki.test.tokens"]


@pytest.mark.guarantee("archive-and-cache")
def test_corrupted_archive_is_refused_and_nothing_changes(server, tmp_path, capsys):
    make_zip(server.srv / "wikitext-2-v1.zip", wikitext(wiki_valid_tokens=b" the dog sat!\n"))
    out = tmp_path / "out"
    out.mkdir()
    fails(knnlm_data(capsys, "wikitext-2", "--dest", out / "wikitext-2", "--url", server.url),
          "wikitext-2/wiki.valid.tokens", "SHA-256", server.url, "not created")
    assert list(out.iterdir()) == []  # no destination, no temporary files

    old = out / "wikitext-2"  # an earlier, damaged copy: kept as it was when the new archive is bad too
    old.mkdir()
    (old / "wiki.train.tokens").write_bytes(b"truncated")
    before = snapshot(old)
    fails(knnlm_data(capsys, "wikitext-2", "--dest", old, "--url", server.url), "SHA-256", "left as it was")
    assert snapshot(old) == before and [p.name for p in out.iterdir()] == ["wikitext-2"]

    make_zip(server.srv / "wikitext-2-v1.zip", wikitext())  # a good archive replaces the damaged copy
    assert knnlm_data(capsys, "wikitext-2", "--dest", old, "--url", server.url).returncode == 0
    assert {p.name: p.read_bytes() for p in old.iterdir()} == TEXTS


@pytest.mark.guarantee("archive-and-cache")
def test_destination_with_other_files_is_never_replaced(server, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    fails(knnlm_data(capsys, "wikitext-2", "--dest", tmp_path, "--url", server.url), "notes.txt", "--dest")
    assert (tmp_path / "notes.txt").read_text() == "mine"


def test_http_and_network_errors_are_one_line(server, tmp_path, capsys):
    dest = tmp_path / "out" / "wikitext-2"
    fails(knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", server.url + "/missing/"), "HTTP 404",
          server.url + "/missing/wikitext-2-v1.zip")
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fails(knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", f"http://127.0.0.1:{port}"), "cannot download")
    (server.srv / "page.zip").write_text("<html>not a zip</html>")
    fails(knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", server.url + "/page.zip"), "not a valid zip")
    assert not dest.parent.exists()  # not even the parent folder it would have made


@pytest.mark.parametrize("member", ["../evil", "/tmp/evil", "wikitext-2/../../evil"])
@pytest.mark.guarantee("archive-and-cache")
def test_zip_slip_members_are_refused(server, tmp_path, capsys, member):
    make_zip(server.srv / "wikitext-2-v1.zip", {**wikitext(), member: b"gotcha"})
    dest = tmp_path / "out" / "wikitext-2"
    fails(knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", server.url), "unsafe member", member)
    assert not dest.parent.exists() and not any(p.name == "evil" for p in tmp_path.rglob("*"))


def test_missing_file_and_missing_folder(server, tmp_path, capsys):
    members = wikitext()
    del members["wikitext-2/wiki.test.tokens"]
    make_zip(server.srv / "wikitext-2-v1.zip", members)
    fails(knnlm_data(capsys, "wikitext-2", "--dest", tmp_path / "d", "--url", server.url), "wiki.test.tokens missing")
    make_zip(server.srv / "wikitext-2-v1.zip", wikitext(folder="wikitext-103"))
    fails(knnlm_data(capsys, "wikitext-2", "--dest", tmp_path / "d", "--url", server.url), "no wikitext-2/ folder")
    assert not (tmp_path / "d").exists()


def test_wikitext103_checks_what_it_can_and_says_checksums_are_not_pinned(server, tmp_path, capsys):
    make_zip(server.srv / "wikitext-103-v1.zip", wikitext(folder="wikitext-103"))
    proc = knnlm_data(capsys, "wikitext-103", "--dest", tmp_path / "wt103", "--url", server.url)
    assert proc.returncode == 0 and "not pinned" in proc.stdout
    make_zip(server.srv / "wikitext-103-v1.zip", wikitext(folder="wikitext-103", wiki_test_tokens=b"\xff\xfe"))
    fails(knnlm_data(capsys, "wikitext-103", "--dest", tmp_path / "bad", "--url", server.url), "not UTF-8")
    make_zip(server.srv / "wikitext-103-v1.zip", wikitext(folder="wikitext-103", wiki_test_tokens=b""))
    fails(knnlm_data(capsys, "wikitext-103", "--dest", tmp_path / "bad", "--url", server.url), "is empty")


@pytest.mark.skipif(not SUMS.is_file(), reason=f"{SUMS} not present")
def test_pinned_wikitext2_checksums_match_the_shared_copy():
    pinned = dict(reversed(line.split()) for line in SUMS.read_text().splitlines() if line.strip())
    assert download.CORPORA["wikitext-2"].sha256 == pinned


# ---------------------------------------------------------------------------------------------------------------
# zip slip, round three: every member's target is checked before any byte is written

@pytest.mark.guarantee("archive-and-cache")
def test_double_slash_member_writes_nothing_outside_the_destination(server, tmp_path, capsys):
    """`wikitext-2//ABS` passed the old check (normalised to `wikitext-2/ABS`) but cutting the prefix left `/ABS`,
    an absolute path: the file was written before the checksums refused the archive."""
    outside = tmp_path / "outside"
    outside.mkdir()
    member = f"wikitext-2/{outside}/X"  # wikitext-2//tmp/.../outside/X
    make_zip(server.srv / "wikitext-2-v1.zip", {**wikitext(), member: b"gotcha"})
    dest = tmp_path / "out" / "wikitext-2"
    fails(knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", server.url), "unsafe member", member)
    assert list(outside.iterdir()) == [] and not dest.parent.exists()
    fails(knnlm_data(capsys, "wikitext-2", "--dest", dest, "--url", (server.srv / "wikitext-2-v1.zip").as_uri()),
          "unsafe member")  # a file:// URL goes the same way
    assert list(outside.iterdir()) == []


def symlink_info(name, target):
    info = zipfile.ZipInfo(name)
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info, target


OUTSIDE = "@OUTSIDE@"  # replaced by the absolute path of a folder beside the destination
PARTS = st.sampled_from(["wikitext-2", "x", "y", "..", ".", "", OUTSIDE, "C:", "a\\b"])
MEMBER = st.tuples(st.lists(PARTS, min_size=1, max_size=4).map("/".join).filter(bool), st.booleans(), st.booleans())


@pytest.mark.filterwarnings("ignore:Duplicate name")
@settings(max_examples=300, deadline=None)
@given(members=st.lists(MEMBER, min_size=1, max_size=6))
@pytest.mark.guarantee("archive-and-cache")
def test_no_archive_writes_outside_the_destination_and_good_ones_unpack(members):
    """Member names built from absolute paths, `..`, `.`, empty components (`//`), with symbolic links and
    duplicates: whatever the archive, nothing appears outside the folder unpacked into; an archive whose names are
    all plain relative paths, without links or duplicates, unpacks completely."""
    with tempfile.TemporaryDirectory() as base:
        base = pathlib.Path(base)
        out, outside = base / "out", base / "outside"
        out.mkdir(), outside.mkdir()
        (outside / "keep").write_bytes(b"keep")
        names = [(name.replace(OUTSIDE, str(outside).lstrip("/")), link, as_dir) for name, link, as_dir in members]
        with zipfile.ZipFile(base / "a.zip", "w") as zf:
            for i, (name, link, as_dir) in enumerate(names):
                if link:
                    zf.writestr(*symlink_info(name, str(outside / "keep")))
                else:
                    zf.writestr(name + "/" if as_dir and not name.endswith("/") else name, b"data %d" % i)
        with zipfile.ZipFile(base / "a.zip") as zf:
            stored = [m.filename for m in zf.infolist()]
        # the reference: a safe archive has only plain relative names ('\\' separates as '/' does), no links, no
        # name twice, no file where another member needs a folder; it unpacks as a plain extraction would
        rel = [n.replace("\\", "/").split("/") for n in stored]
        clean = (not any(link for _, link, _ in names) and len({tuple(p for p in r if p) for r in rel}) == len(rel)
                 and all(p not in ("", ".", "..") for r in rel for p in (r[:-1] if r[-1] == "" else r))
                 and not any(":" in r[0] for r in rel))
        files = {tuple(r) for r in rel if r[-1] != ""}
        clean = clean and not any(tuple(r[:i]) in files for r in rel for i in range(1, len(r)))
        try:
            download.unpack(base / "a.zip", "URL", "wikitext-2", out)
            ok = True
        except download.UserError as e:
            assert "\n" not in str(e)
            ok = False
        assert sorted(p.name for p in base.iterdir()) == ["a.zip", "out", "outside"]
        assert [p.name for p in outside.iterdir()] == ["keep"] and (outside / "keep").read_bytes() == b"keep"
        assert all(os.path.realpath(p).startswith(str(out) + "/") and not p.is_symlink() for p in out.rglob("*"))
        mine = [r[1:] for r in rel if r[0] == "wikitext-2" and len(r) > 1 and r[1:] != [""]]
        if clean and mine:
            assert ok
            want = {"/".join(r) for r in mine if r[-1] != ""}
            got = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
            assert got == want
        elif clean:
            assert not ok  # no wikitext-2/ folder in it
        else:
            assert not ok and not any(out.iterdir())  # refused before anything was written


@pytest.mark.guarantee("resumable")
def test_sigterm_while_unpacking_leaves_no_partial_archive(server, tmp_path, capsys, monkeypatch):
    """SIGTERM used to end `knnlm data` on the spot, leaving `.wikitext-2.*.zip.part` beside the destination."""
    import signal
    import time

    def terminated(*args):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends

    monkeypatch.setattr(download, "unpack", terminated)
    (tmp_path / "out").mkdir()
    proc = knnlm_data(capsys, "wikitext-2", "--dest", tmp_path / "out" / "wikitext-2", "--url", server.url)
    assert proc.returncode == 143 and proc.stderr.strip().splitlines()[-1].startswith("knnlm: terminated;")
    assert list((tmp_path / "out").iterdir()) == []
