"""`tramontane serve` flags: sizes, bad values and models that cannot be served fail with a message."""

from __future__ import annotations

import socket

import pytest

from tramontane.cli.main import main
from tramontane.errors import TramontaneError
from tramontane.serve.server import available_memory, parse_size


def test_parse_size():
    assert parse_size("512M", "--x") == 512 << 20
    assert parse_size("1.5G", "--x") == 3 << 29
    assert parse_size("2GiB", "--x") == parse_size("2gb", "--x") == 2 << 30
    assert parse_size("1000", "--x") == 1000 and parse_size("64k", "--x") == 64 << 10
    assert 0 < parse_size("20%", "--kv", allow_percent=True) <= available_memory() * 0.21
    for bad in ("", "abc", "0", "-5M", "1.5.2G", "12X"):
        with pytest.raises(TramontaneError, match="--x"):
            parse_size(bad, "--x")
    with pytest.raises(TramontaneError, match="percentage"):
        parse_size("150%", "--kv", allow_percent=True)
    with pytest.raises(TramontaneError):
        parse_size("20%", "--max-body-bytes")


def test_bad_flags_and_missing_model_fail_before_serving(capsys, tmp_path):
    assert main(["serve", str(tmp_path / "nope.gguf")]) == 1
    assert "nope.gguf: no such file or folder" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--kv-cache-memory", "lots"]) == 1
    assert "--kv-cache-memory must be" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 1
    assert "--port" in capsys.readouterr().err


def test_a_model_that_fails_to_load_stops_the_server(capsys, tmp_path):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 60)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["serve", str(bad), "--port", str(port), "--kv-cache-memory", "1M"]) == 1
    err = capsys.readouterr().err
    assert "broken.gguf" in err and "tramontane: error:" in err


def test_no_mmap_reaches_the_loader(monkeypatch, tmp_path):
    """`--no-mmap` (run, chat, serve) is passed to the loader as mmap=False; mapped is the default."""
    import tramontane.api

    seen = []

    def fake_load(model, **kw):
        seen.append(kw["mmap"])
        raise TramontaneError("stop here")

    monkeypatch.setattr(tramontane.api, "load", fake_load)
    model = str(tmp_path)
    for argv in (["run", model, "hi"], ["run", model, "hi", "--no-mmap"], ["chat", model, "--no-mmap"]):
        assert main(argv) == 1
    assert seen == [True, False, False]


def test_serve_no_mmap_reaches_the_server_options(monkeypatch, tmp_path):
    import tramontane.serve.server as server

    seen = []
    monkeypatch.setattr(server, "serve", lambda opts, *a, **k: seen.append(opts.mmap) or 0)
    for argv in (["serve", str(tmp_path)], ["serve", str(tmp_path), "--no-mmap"]):
        main(argv)
    assert seen == [True, False]
