"""The tokens file (sha256 hashes, re-read on change) and `ditserve token`."""

from __future__ import annotations

import hashlib
import io
import os
import stat

import pytest
from ditserve.cli import main
from ditserve.security.tokens import TokenFile, hash_token, new_token, parse_tokens


def test_hash_is_sha256_of_the_token():
    assert hash_token("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()
    assert len(new_token()) >= 43 and new_token() != new_token()


def test_check_names_the_matching_entry(tmp_path):
    a, b = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(f"\n# comment\n{hash_token(a)} gateway\n  {hash_token(b)}  \n")
    tokens = TokenFile(path)
    assert tokens.check(a) == "gateway"
    assert tokens.check(b) == "line-4"
    assert tokens.check(a + "x") is None and tokens.check("") is None


def test_a_bad_line_is_named_never_echoed(tmp_path):
    secret = new_token()
    with pytest.raises(ValueError) as error:
        parse_tokens(f"{hash_token(new_token())}\n{secret}\n", tmp_path / "t")
    assert "line 2" in str(error.value) and secret not in str(error.value)
    with pytest.raises(ValueError, match="cannot read tokens file"):
        TokenFile(tmp_path / "missing")


def test_file_is_reread_when_it_changes(tmp_path):
    a, b = new_token(), new_token()
    path = tmp_path / "tokens"
    path.write_text(hash_token(a) + "\n")
    tokens = TokenFile(path)
    assert tokens.check(a) and not tokens.check(b)
    path.write_text(hash_token(b) + " second-version-longer\n")  # rewritten in place
    assert tokens.check(b) and not tokens.check(a)
    path.unlink()  # gone (mid-rotation): the last good version stays
    assert tokens.check(b)


def test_token_new_prints_the_token_and_stores_its_hash(tmp_path, capsys):
    path = tmp_path / "tokens"
    assert main(["token", "new", "--tokens", str(path), "--name", "ci"]) == 0
    token = capsys.readouterr().out.strip()
    assert path.read_text() == f"{hash_token(token)} ci\n"
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert TokenFile(path).check(token) == "ci"


def test_token_hash_reads_stdin(monkeypatch, capsys):
    monkeypatch.setattr("sys.stdin", io.StringIO("s3cret\n"))
    assert main(["token", "hash", "--name", "bob"]) == 0
    assert capsys.readouterr().out == f"{hash_token('s3cret')} bob\n"
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    assert main(["token", "hash"]) == 2
    assert capsys.readouterr().err == "ditserve token: no token on stdin\n"
