"""The download scripts run against servers on 127.0.0.1 that serve local files."""

import hashlib
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from contextlib import contextmanager
from urllib.parse import unquote, urlparse

import pytest

import download_data
import download_llm_weights
from conftest import DEMO, ROOT

COMMIT = "a" * 40


@contextmanager
def serve(handler_class):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler_class)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def static_handler(root):
    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=root, **kwargs)

        def log_message(self, *args):
            pass
    return Handler


def test_download_data_fetches_validates_and_reports(tmp_path):
    target = tmp_path / "data"
    with serve(static_handler(DEMO)) as url:
        assert download_data.main(["--data_name", "cima", "--data_dir", str(target),
                                   "--base_url", url]) == 0
        for split in ("train", "valid", "test"):
            assert (target / f"cima-{split}.txt").read_bytes() == \
                open(os.path.join(DEMO, f"cima-{split}.txt"), "rb").read()
        assert download_data.main(["--data_name", "p4g", "--data_dir", str(target),
                                   "--base_url", url]) == 0
        assert (target / "P4G" / "dev.json").exists()


def test_download_data_never_replaces_good_data_with_a_broken_file(tmp_path, capsys):
    mirror = tmp_path / "mirror"
    shutil.copytree(DEMO, mirror)
    (mirror / "esc-test.txt").write_text("not json\n")
    (mirror / "esc-valid.txt").write_text("")  # an empty download
    target = tmp_path / "data"
    target.mkdir()
    (target / "esc-test.txt").write_text("previous\n")
    (target / "esc-valid.txt").write_text("previous\n")
    with serve(static_handler(str(mirror))) as url:
        code = download_data.main(["--data_name", "esc", "--data_dir", str(target),
                                   "--base_url", url])
    assert code == 2
    assert (target / "esc-test.txt").read_text() == "previous\n"
    assert (target / "esc-valid.txt").read_text() == "previous\n"
    assert (target / "esc-train.txt").exists()  # the other files still came
    out, err = capsys.readouterr()
    assert "esc-train.txt: new, 4 cases" in out
    errors = err.strip().splitlines()
    assert len(errors) == 2 and all(e.startswith("error: esc-") for e in errors)
    assert "no cases" in err and "not valid JSON" in err and "existing file is kept" in err


@pytest.mark.slow
def test_extes_comes_from_the_release_by_default_and_from_its_authors_on_request(tmp_path,
                                                                                  capsys):
    """A server laid out as raw.githubusercontent.com (--github): ExTES is the DialogXpert
    release's data/ExTES/ExTES.json, which its misc.load_extes reads, unless
    --extes_source authors asks for pandazzh2020/ExTES's; --base_url still serves the
    data folder's layout."""
    with open(os.path.join(DEMO, "ExTES", "ExTES.json")) as f:
        cases = json.load(f)
    github = tmp_path / "github"
    copies = {"declare-lab/dialogxpert/main/data/ExTES/ExTES.json": cases[:3],
              "pandazzh2020/ExTES/main/ExTES.json": cases[3:5]}
    for path, content in copies.items():
        (github / path).parent.mkdir(parents=True, exist_ok=True)
        (github / path).write_text(json.dumps(content))
    target = tmp_path / "data"
    downloaded = target / "ExTES" / "ExTES.json"
    with serve(static_handler(str(github))) as url:
        common = ["--data_name", "extes", "--data_dir", str(target), "--github", url]
        assert download_data.main(common) == 0
        assert json.loads(downloaded.read_text()) == cases[:3]
        assert download_data.main(common + ["--extes_source", "authors"]) == 0
        assert json.loads(downloaded.read_text()) == cases[3:5]
        (github / "pandazzh2020" / "ExTES" / "main" / "ExTES.json").unlink()  # only a zip
        capsys.readouterr()
        assert download_data.main(common + ["--extes_source", "authors"]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("error: ExTES/ExTES.json failed")
        assert "/pandazzh2020/ExTES/main/ExTES.json" in err and "existing file is kept" in err
        assert json.loads(downloaded.read_text()) == cases[3:5]
    with serve(static_handler(DEMO)) as url:
        assert download_data.main(["--data_name", "extes", "--data_dir", str(target),
                                   "--base_url", url]) == 0
        assert json.loads(downloaded.read_text()) == cases
    capsys.readouterr()
    assert download_data.main(["--data_name", "extes", "--extes_source", "pandazzh"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: unknown --extes_source 'pandazzh'. Pass one of ['authors', 'release']"


def test_bad_flags_are_one_error_line(tmp_path):
    from errors import UserError

    with pytest.raises(UserError, match=r"--timeout 0.0 is out of range: pass seconds > 0"):
        download_data.main(["--timeout", "0", "--data_dir", str(tmp_path)])
    with pytest.raises(UserError, match="unrecognized arguments: --nope"):
        download_llm_weights.main(["--nope"])
    assert not os.listdir(tmp_path)
    for script in ("download_data.py", "download_llm_weights.py"):  # their __main__
        done = subprocess.run([sys.executable, script, "--nope"], cwd=ROOT,
                              capture_output=True, text=True)
        assert done.returncode == 2 and done.stderr == (
            f"error: unrecognized arguments: --nope. See `python {script} --help`\n")


def hub_handler(files):
    """Answers the hub routes that snapshot_download uses: revision info, file tree and
    file downloads."""
    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _file(self, send_body):
            path = unquote(urlparse(self.path).path)
            if "/api/models/" in path and "/tree/" in path:
                body = json.dumps([{"type": "file", "path": n, "size": len(c),
                                    "oid": hashlib.sha1(c).hexdigest()}
                                   for n, c in files.items()]).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
            elif "/api/models/" in path:
                body = json.dumps({"id": "test/tiny", "sha": COMMIT,
                                   "siblings": [{"rfilename": n} for n in files]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
            elif "/resolve/" in path and path.split("/resolve/", 1)[1].split("/", 1)[1] in files:
                name = path.split("/resolve/", 1)[1].split("/", 1)[1]
                body = files[name]
                self.send_response(200)
                self.send_header("ETag", '"' + hashlib.sha1(body).hexdigest() + '"')
                self.send_header("X-Repo-Commit", COMMIT)
            else:
                self.send_response(404)
                body = b"{}"
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if send_body:
                self.wfile.write(body)

        def do_GET(self):
            self._file(True)

        def do_HEAD(self):
            self._file(False)
    return Handler


def test_download_llm_weights_uses_snapshot_download(tmp_path, monkeypatch, capsys):
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}"}
    monkeypatch.setenv("HF_TOKEN", "secret-token-value")
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    with serve(hub_handler(files)) as url:
        code = download_llm_weights.main(["--repo_id", "test/tiny", "--local_dir",
                                          str(tmp_path / "tiny"), "--endpoint", url])
    assert code == 0
    for name, content in files.items():
        assert (tmp_path / "tiny" / name).read_bytes() == content
    printed = capsys.readouterr()
    assert "secret-token-value" not in printed.out + printed.err


def test_download_llm_weights_failure_is_one_line(tmp_path, capsys):
    code = download_llm_weights.main(["--repo_id", "test/missing", "--endpoint",
                                      "http://127.0.0.1:9", "--local_dir", str(tmp_path / "w")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: could not download test/missing")
    assert len(err.splitlines()) == 1
