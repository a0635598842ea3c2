"""`knnlm data`: a fake WikiText archive served from 127.0.0.1 (no network), its checksums patched in."""

import dataclasses
import functools
import hashlib
import http.server
import socket
import threading
import zipfile
from types import SimpleNamespace

import pytest

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
