"""The standing red-team suite: hostile or unlucky inputs that once broke the harness.

Each case here failed on the main branch of its day (a hang, a traceback, a wrong row, a
silently used corrupt file); each one that used to hang runs under a time bound, and each run
that stops asserts that nothing finished was lost. Add a case when a new hole is found.

Second round (this file): a stalled ``pretrained:`` server, weights/records/claims/images that
are FIFOs or devices, reference statistics and npz batches checked before work, prompt sets,
a full disk while writing records and caches, ``|`` and newlines in markdown cells, claim files
that cannot be parsed, corrupt caches (reference features, feature chunks, teachers).

First round, kept in the files of what they guard (run by ``make test`` with this one):

- pickles that run code are refused: ``tests/test_weights.py::test_a_pickle_with_code_is_refused_and_never_run``,
  ``::test_the_evil_pickle_would_run_with_plain_torch_load``, ``::test_junk_files_are_one_line_errors``;
  ``tests/test_fid.py::test_the_reference_cache_holds_no_pickles_and_never_unpickles``;
  ``::test_a_yacs_config_is_read_as_plain_dicts_without_importing_yacs`` (test_weights.py).
- YAML alias bombs and runaway matrices: ``tests/test_suite.py::test_alias_bomb_is_refused_at_once``,
  ``::test_matrix_of_ten_million_cells_is_refused_at_once``, ``::test_cell_limit_counts_includes_and_can_be_raised``,
  ``::test_bad_suites_fail_cleanly``, ``::test_suite_that_is_a_directory``.
- user text never read as rich markup: ``tests/test_cli.py::test_user_text_is_never_read_as_markup``.
- claims and records shared between runs: ``tests/test_runner.py::test_claims_stale_taken_over_live_and_foreign_respected``,
  ``::test_concurrent_runs_run_each_cell_once``, ``::test_run_redoes_malformed_and_incomplete_records``,
  ``::test_write_record_is_atomic``, ``::test_records_honour_the_umask``.
"""
from __future__ import annotations

import errno
import json
import os
import re
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import harness
from harness import UserError
from harness.cli import main
from harness.records import load_records, read_record, write_record

BOUND_S = 20.0  # every case that once hung must end well within this


def within(seconds: float, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` in a daemon thread; the test fails (instead of hanging) when it
    is still running after ``seconds``. Exceptions come back to the caller."""
    box: dict = {}

    def target():
        try:
            box["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: B036 - handed back to the test
            box["error"] = exc

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"still running after {seconds} s: it hangs"
    if "error" in box:
        raise box["error"]
    return box.get("value")


@contextmanager
def silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(2)
        for conn in held:
            conn.close()
        server.close()


def _tiny_dit(**kw):
    return harness.create("backbone", "dit", size="tiny", input_size=8, patch=2, depth=1, hidden_size=32,
                          num_heads=2, num_classes=4, **kw)


def _one_line(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# -- network ---------------------------------------------------------------------------------
DIT_SUITE = """\
suite: stall
seed: 0
base:
  backbone: {{name: dit, size: tiny, input_size: 8, patch: 2, depth: 1, hidden_size: 32, num_heads: 2,
             num_classes: 4}}
  metrics: [params]
  device: cpu
matrix:
  backbone.pretrained: ["{local}", "http://127.0.0.1:{port}/weights/DiT-tiny.pt", "{local2}"]
"""


def test_a_stalled_weights_server_fails_its_cell_in_one_line_and_the_suite_goes_on(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HARNESS_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("HARNESS_READ_TIMEOUT", "1")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    local = tmp_path / "dit.pt"
    torch.save(_tiny_dit().state_dict(), local)
    results = tmp_path / "results"
    with silent_server() as port:
        suite = tmp_path / "stall.yaml"
        local2 = tmp_path / "dit2.pt"  # a second local cell, after the stalled one
        local2.write_bytes(local.read_bytes())
        suite.write_text(DIT_SUITE.format(local=local, local2=local2, port=port))
        started = time.monotonic()
        code = within(BOUND_S, main, ["run", str(suite), "--results", str(results)])
        assert time.monotonic() - started < BOUND_S
    assert code == 1  # one cell failed, the others ran
    records = load_records(results / "stall")
    assert sorted(r["status"] for r in records) == ["failed", "ok", "ok"]
    failed = next(r for r in records if r["status"] == "failed")
    assert "\n" not in failed["error"]
    assert f"http://127.0.0.1:{port}/weights/DiT-tiny.pt" in failed["error"]
    assert "timeout of 1 s" in failed["error"] and "HARNESS_READ_TIMEOUT" in failed["error"]
    assert not list((tmp_path / "torch").rglob("*.tmp")) and not list((tmp_path / "torch").rglob("DiT-tiny.pt"))


def test_a_server_that_never_accepts_is_bounded_by_the_connect_timeout(monkeypatch, tmp_path):
    from harness.weights import fetch

    monkeypatch.setenv("HARNESS_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("HARNESS_READ_TIMEOUT", "1")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(0)  # a backlog that fills: later connections wait in SYN
    fillers = []
    try:
        port = server.getsockname()[1]
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        with pytest.raises(UserError, match=r"http://127.0.0.1:\d+/w.pt did not answer within the (connect|read) "
                                            r"timeout of 1 s"):
            within(BOUND_S, fetch, f"http://127.0.0.1:{port}/w.pt", tmp_path / "w.pt")
    finally:
        for s in fillers:
            s.close()
        server.close()
    assert not list(tmp_path.iterdir())


def test_a_stalled_data_set_download_is_bounded(tmp_path, monkeypatch):
    """torchvision's CIFAR-10 download has no timeout of its own; the harness bounds it."""
    from torchvision.datasets import CIFAR10

    from harness_data import cifar10

    monkeypatch.setenv("HARNESS_CONNECT_TIMEOUT", "1")
    monkeypatch.setenv("HARNESS_READ_TIMEOUT", "1")
    with silent_server() as port:
        monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
        with pytest.raises(UserError, match="cifar10: cannot download"):
            within(BOUND_S, cifar10, root=str(tmp_path / "data"), download=True)


@contextmanager
def http_server(body: bytes, announced: int | None = None):
    """127.0.0.1 HTTP server answering every GET with ``body`` and a Content-Length of
    ``announced`` (the body's own length unless told), then closing."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", str(len(body) if announced is None else announced))
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            self.close_connection = True

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


def test_a_download_shorter_than_announced_keeps_nothing(tmp_path, monkeypatch):
    from harness.weights import fetch

    monkeypatch.setenv("HARNESS_READ_TIMEOUT", "2")
    with http_server(b"x" * 100, announced=1000) as port:
        with pytest.raises(UserError, match=r"(ended after 100 of the 1000 bytes|cannot download)"):
            within(BOUND_S, fetch, f"http://127.0.0.1:{port}/w.pt", tmp_path / "w.pt")
        assert not list(tmp_path.iterdir())  # no partial file, no temporary
        with http_server(b"y" * 100) as port2:
            within(BOUND_S, fetch, f"http://127.0.0.1:{port2}/w.pt", tmp_path / "w.pt")
    assert (tmp_path / "w.pt").read_bytes() == b"y" * 100


def test_downloads_refuse_more_than_the_byte_limit(tmp_path, monkeypatch):
    from harness.weights import fetch

    monkeypatch.setenv("HARNESS_DOWNLOAD_MAX_BYTES", "50")
    with http_server(b"z" * 100) as port:
        with pytest.raises(UserError, match="over HARNESS_DOWNLOAD_MAX_BYTES=50"):
            within(BOUND_S, fetch, f"http://127.0.0.1:{port}/w.pt", tmp_path / "w.pt")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("value", ["soon", "0", "-3"])
def test_a_bad_timeout_setting_is_one_line(monkeypatch, value):
    from harness.weights import net_timeouts

    monkeypatch.setenv("HARNESS_READ_TIMEOUT", value)
    with pytest.raises(UserError, match=f"HARNESS_READ_TIMEOUT='{value}': expected a positive number"):
        net_timeouts()


# -- paths that are not regular files ---------------------------------------------------------------
@pytest.fixture
def fifo(tmp_path):
    def make(name: str) -> Path:
        path = tmp_path / name
        os.mkfifo(path)
        return path

    return make


@pytest.mark.parametrize("kind", ["fifo", "directory", "device"])
def test_weights_that_are_not_regular_files_are_refused_unopened(tmp_path, fifo, kind):
    from harness.weights import load_state_dict

    path = {"fifo": lambda: fifo("w.pt"), "directory": lambda: (tmp_path / "w.pt").mkdir() or tmp_path / "w.pt",
            "device": lambda: Path("/dev/zero")}[kind]()
    with pytest.raises(UserError, match="expected a regular file"):
        within(BOUND_S, load_state_dict, str(path), what="pretrained")


def test_a_fifo_in_a_results_folder_is_skipped_not_waited_on(tmp_path, fifo):
    folder = tmp_path / "suite"
    folder.mkdir()
    write_record(folder / "a.json", {"suite": "s", "cell": "a", "config": {}, "status": "ok", "error": None,
                                     "metrics": {}, "env": {}, "plugins": {}})
    os.mkfifo(folder / "b.json")
    records = within(BOUND_S, load_records, folder)
    assert [r["cell"] for r in records] == ["a"]


def test_a_fifo_among_the_samples_is_refused_before_work(tmp_path, fifo, capsys):
    from PIL import Image

    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(samples / f"{i}.png")
    os.mkfifo(samples / "3.png")
    ref = tmp_path / "ref.npz"
    np.savez(ref, np.zeros((4, 8, 8, 3), np.uint8))
    assert within(BOUND_S, main, ["fid", str(samples), str(ref), "--metrics", "fid"]) == 2
    assert "3.png" in _one_line(capsys.readouterr().err)


# -- inputs checked before work --------------------------------------------------------------------
def test_reference_statistics_of_another_width_are_refused_before_any_feature(tmp_path, capsys, monkeypatch):
    """`harness fid SAMPLES REF.npz` whose mu/sigma are 10-wide: one line, exit 2, nothing extracted."""
    from PIL import Image

    from harness_quality import evaluate

    def no_work(*a, **k):
        raise AssertionError("features were extracted before the reference was checked")

    monkeypatch.setattr(evaluate, "features_of", no_work)
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    samples = tmp_path / "samples"
    samples.mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i * 9, np.uint8)).save(samples / f"{i}.png")
    np.savez(tmp_path / "ref.npz", mu=np.zeros(10), sigma=np.eye(10))
    weights = tmp_path / "inception.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    code = main(["fid", str(samples), str(tmp_path / "ref.npz"), "--metrics", "fid", "--weights", str(weights),
                 "--cpu"])
    line = _one_line(capsys.readouterr().err)
    assert code == 2
    assert "ref.npz" in line and "dimension 10" in line and "2048" in line


@pytest.mark.parametrize("content, message", [
    (dict(mu=np.zeros(3), sigma=np.eye(4)), r"'mu' \(3,\) and 'sigma' \(4, 4\) are not a mean"),
    (dict(mu=np.zeros(3)), "has 'mu' without 'sigma'"),
    (dict(arr_0=np.zeros((2, 8, 8, 4), np.uint8)), r"must be \(N, H, W, 3\) uint8"),
])
def test_npz_shapes_are_checked_from_the_headers_before_any_array_is_read(tmp_path, monkeypatch, content, message):
    from harness_quality import adm

    read = []
    real = np.lib.npyio.NpzFile.__getitem__
    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", lambda self, key: read.append(key) or real(self, key))
    path = tmp_path / "bad.npz"
    np.savez_compressed(path, **content)
    with pytest.raises(UserError, match=message):
        adm.read_npz(path, what="REFERENCE")
    assert read == []  # refused on the headers: not one array loaded


def test_a_truncated_npz_is_one_line(tmp_path):
    from harness_quality import adm

    path = tmp_path / "ref.npz"
    np.savez(path, np.zeros((50, 16, 16, 3), np.uint8))
    path.write_bytes(path.read_bytes()[:20_000])
    with pytest.raises(UserError, match="ref.npz"):
        adm.read_npz(path, what="REFERENCE")


def test_a_prompt_set_that_is_not_text_is_one_line(tmp_path):
    from harness_t2i.prompts import read_prompt_set

    path = tmp_path / "prompts.txt"
    path.write_bytes(b"a cat\n\xff\xfe a dog\n")
    with pytest.raises(UserError, match=r"prompts.txt.*UTF-8"):
        read_prompt_set(path)


def test_a_prompt_set_that_is_a_fifo_is_refused_not_waited_on(tmp_path, fifo):
    from harness_t2i.prompts import read_prompt_set

    with pytest.raises(UserError, match="prompts.txt"):
        within(BOUND_S, read_prompt_set, fifo("prompts.txt"))


# -- a full disk -----------------------------------------------------------------------------------
TOY_SUITE = """\
suite: disk
seed: 0
base:
  backbone: {name: dit, size: tiny, input_size: 8, patch: 2, depth: 1, hidden_size: 32, num_heads: 2, num_classes: 4}
  metrics: [params]
  device: cpu
matrix:
  backbone.hidden_size: [32, 48, 64]
"""


def _full_disk_after(monkeypatch, n_ok: int):
    """os.fsync raises ENOSPC once ``n_ok`` calls have passed (a disk that fills up)."""
    real, calls = os.fsync, []

    def fsync(fd):
        calls.append(fd)
        if len(calls) > n_ok:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_a_full_disk_while_writing_records_is_one_line_and_a_rerun_finishes(tmp_path, monkeypatch, capsys):
    suite = tmp_path / "disk.yaml"
    suite.write_text(TOY_SUITE)
    results = tmp_path / "results"
    with monkeypatch.context() as m:
        _full_disk_after(m, 1)  # the first record is written, the second finds the disk full
        code = main(["run", str(suite), "--results", str(results)])
    err = capsys.readouterr().err
    assert code == 2
    line = _one_line(err)
    assert str(results / "disk") in line and "no space left" in line
    assert re.search(r"the record [0-9a-f]+\.json; it needs [\d.]+ (bytes|KiB) free there", line), line
    folder = results / "disk"
    first = load_records(folder)
    assert len(first) == 1 and first[0]["status"] == "ok"
    assert sorted(p.name for p in folder.iterdir() if p.is_file()) == [f"{first[0]['cell']}.json"]  # no tmp, no claim
    # space freed: the rerun keeps the finished cell and runs the rest
    assert main(["run", str(suite), "--results", str(results)]) == 0
    records = load_records(folder)
    assert len(records) == 3 and {r["status"] for r in records} == {"ok"}
    assert read_record(folder / f"{first[0]['cell']}.json")["finished"] == first[0]["finished"]


def test_a_full_disk_keeps_the_previous_record_whole(tmp_path, monkeypatch):
    path = tmp_path / "r" / "cell.json"
    old = {"suite": "s", "cell": "cell", "config": {}, "status": "ok", "error": None, "metrics": {"a": 1},
           "env": {}, "plugins": {}}
    write_record(path, old)
    _full_disk_after(monkeypatch, 0)
    with pytest.raises(UserError, match=rf"{re.escape(str(path.parent))}: no space left on device while writing "
                                        r"the record cell.json; it needs \d+ bytes free"):
        write_record(path, {**old, "metrics": {"a": 2}})
    assert json.loads(path.read_text()) == old and os.listdir(path.parent) == ["cell.json"]


def test_a_full_quota_while_caching_features_is_one_line(tmp_path, monkeypatch):
    from harness_quality.evaluate import _save_npz

    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError(errno.EDQUOT, "Disk quota exceeded")))
    with pytest.raises(UserError, match=r"cache.*quota exceeded while writing the feature cache c.npz; it needs "
                                        r"8.0 KiB free"):
        _save_npz(tmp_path / "cache" / "c.npz", pool=np.zeros((1024, 2), np.float32))
    assert os.listdir(tmp_path / "cache") == []


def test_a_full_disk_while_caching_reference_features_leaves_nothing(tmp_path, monkeypatch):
    from harness_quality.fidelity import _cached_features

    _full_disk_after(monkeypatch, 0)
    with pytest.raises(UserError, match="no space left on device while writing the reference feature cache"):
        _cached_features(tmp_path / "c", "ref", ["2048"], lambda: {"2048": torch.ones(4, 3)})
    assert os.listdir(tmp_path / "c") == []


# -- markdown ----------------------------------------------------------------------------------------
def _record(cell: str, label: str, value: str, metric: float) -> dict:
    return {"suite": "md", "cell": cell, "label": label, "index": 0, "seed": 0, "status": "ok", "error": None,
            "config": {"backbone": {"name": "toy", "note": value}, "device": "cpu"},
            "metrics": {"params": {"value": metric, "direction": "lower", "unit": "M", "role": "cost"}},
            "env": {}, "plugins": {}}


def _columns(line: str) -> int:
    return len(re.findall(r"(?<!\\)\|", line))


@pytest.mark.parametrize("command", [["table"], ["leaderboard"]])
def test_a_pipe_or_newline_in_a_record_keeps_markdown_rows_whole(tmp_path, capsys, command):
    folder = tmp_path / "results" / "md"
    write_record(folder / "a.json", _record("a", "width|2", "x|y", 1.0))
    write_record(folder / "b.json", _record("b", "two\nlines", "p\nq|r", 2.0))
    assert main([*command, str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    table = [line for line in out.splitlines() if line.startswith("|")]
    assert len(table) == 4, out  # header, rule, one row per record
    assert len({_columns(line) for line in table}) == 1, out
    assert "x\\|y" in out and "p<br>q\\|r" in out


# -- claims -------------------------------------------------------------------------------------------
def _age(path: Path, seconds: float) -> None:
    past = time.time() - seconds
    os.utime(path, (past, past))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"host": "h", "pid": 99999999999999999999}',
                                     '{"host": "me", "pid": true}', "\xff\xfe"])
def test_an_old_claim_that_cannot_be_parsed_is_taken_over(tmp_path, content):
    from harness import claims

    record = tmp_path / "cell.json"
    (tmp_path / "cell.claim").write_bytes(content.encode("latin-1"))
    _age(tmp_path / "cell.claim", claims.EMPTY_GRACE_S + 5)
    got = claims.claim(record)
    assert isinstance(got, claims.Claim)
    got.release()
    assert not (tmp_path / "cell.claim").exists()


def test_a_fresh_claim_that_cannot_be_parsed_is_named(tmp_path):
    from harness import claims

    (tmp_path / "cell.claim").write_text('{"host": "h", "pid": "twelve"}')
    got = claims.claim(tmp_path / "cell.json")
    assert isinstance(got, dict)
    assert re.search(r"claim file .*cell.claim has no valid pid \('twelve'\)", claims.describe(got))


@pytest.mark.parametrize("kind", ["directory", "fifo"])
def test_a_claim_that_is_not_a_file_is_named_never_waited_on_nor_removed(tmp_path, fifo, kind):
    from harness import claims

    path = tmp_path / "cell.claim"
    path.mkdir() if kind == "directory" else os.mkfifo(path)
    _age(path, claims.EMPTY_GRACE_S + 5)
    got = within(BOUND_S, claims.claim, tmp_path / "cell.json")
    assert isinstance(got, dict) and "expected a regular file" in claims.describe(got)
    assert str(path) in claims.describe(got) and os.path.lexists(path)


def test_a_run_skips_a_cell_whose_claim_is_a_directory_and_finishes_the_rest(tmp_path, capsys):
    suite = tmp_path / "disk.yaml"
    suite.write_text(TOY_SUITE)
    results = tmp_path / "results"
    assert main(["run", str(suite), "--results", str(results), "--dry-run"]) == 0
    out = capsys.readouterr().out
    first = re.search(r"\b([0-9a-f]{12})\b", out)
    assert first, out
    (results / "disk").mkdir(parents=True, exist_ok=True)
    (results / "disk" / f"{first.group(1)}.claim").mkdir()
    code = within(60, main, ["run", str(suite), "--results", str(results)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and code == 75  # the CLI's status for cells left to another run
    assert f"{first.group(1)}.claim" in captured.out + captured.err
    assert len(load_records(results / "disk")) == 2


# -- corrupt caches ----------------------------------------------------------------------------------
def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


def test_reference_features_whose_bytes_changed_are_recomputed(tmp_path, capsys):
    from harness_quality.fidelity import _cached_features

    calls = []

    def compute():
        calls.append(1)
        return {"2048": torch.arange(12.0).reshape(4, 3)}

    first = _cached_features(tmp_path, "ref", ["2048"], compute)
    again = _cached_features(tmp_path, "ref", ["2048"], compute)
    assert len(calls) == 1 and torch.equal(first["2048"], again["2048"])
    entry = tmp_path / "ref-features-2048.safetensors"
    _flip_last_byte(entry)  # a bit gone bad on disk: still a valid safetensors file
    fixed = _cached_features(tmp_path, "ref", ["2048"], compute)
    assert len(calls) == 2 and torch.equal(fixed["2048"], torch.arange(12.0).reshape(4, 3))
    assert "ref-features-2048.safetensors: cache entry does not match its digest" in capsys.readouterr().err
    entry.write_bytes(entry.read_bytes()[:40])  # truncated
    _cached_features(tmp_path, "ref", ["2048"], compute)
    assert len(calls) == 3


def test_a_feature_chunk_with_the_wrong_rows_is_recomputed(tmp_path):
    from harness_quality import evaluate
    from harness_quality.features import Features

    class Images:
        count, arg = 3, "SAMPLES"

        def content_key(self):
            return "k"

        def batches(self, start, stop, size):
            yield np.zeros((stop - start, 8, 8, 3), np.uint8)

    runs = []

    def run(model, batches, device, progress):
        n = sum(len(b) for b in batches)
        runs.append(n)
        progress(n)
        return Features(np.ones((n, 2)), np.ones((n, 2)), np.ones((n, 2)))

    net = evaluate.Network("net", "Net", lambda: None, run)
    evaluate.features_of(Images(), net, device="cpu", batch_size=2, cache=tmp_path)
    (chunk,) = tmp_path.rglob("*.npz")
    evaluate._save_npz(chunk, pool=np.ones((1, 2)), spatial=np.ones((1, 2)), logits=np.ones((1, 2)))
    got = evaluate.features_of(Images(), net, device="cpu", batch_size=2, cache=tmp_path)
    assert runs == [3, 3] and got.pool.shape == (3, 2)


def _tiny_sampler_model():
    torch.manual_seed(0)
    return harness.create("backbone", "dit", size="tiny", depth=1, hidden_size=32, num_heads=2, input_size=8,
                          in_channels=3, num_classes=3, patch=2)


SAMPLE_KW = dict(shape=(3, 8, 8), num_classes=3, seed=7, steps=2, sampler="ddim")


def test_a_torn_image_in_a_sample_folder_is_drawn_again(tmp_path, capsys):
    """A resumed sampling (or a teacher folder shared by a suite's cells) never keeps a torn PNG."""
    from harness import sampling

    sampling.sample_to_folder(_tiny_sampler_model(), tmp_path, 4, batch_size=2, **SAMPLE_KW)
    whole = {p.name: p.read_bytes() for p in tmp_path.glob("*.png")}
    torn = tmp_path / "000003.png"
    torn.write_bytes(whole["000003.png"][:-20])
    sampling.sample_to_folder(_tiny_sampler_model(), tmp_path, 4, batch_size=2, **SAMPLE_KW)
    assert {p.name: p.read_bytes() for p in tmp_path.glob("*.png")} == whole
    assert "000003.png: not a whole image" in capsys.readouterr().err


def test_a_full_disk_while_writing_sample_images_is_one_line_and_resumes(tmp_path, monkeypatch):
    from harness import sampling

    with monkeypatch.context() as m:
        _full_disk_after(m, 2)  # two images fit
        with pytest.raises(UserError, match=rf"{re.escape(str(tmp_path))}: no space left on device while writing "
                                            r"the image 000002.png; it needs 192 bytes free"):
            sampling.sample_to_folder(_tiny_sampler_model(), tmp_path, 4, batch_size=2, **SAMPLE_KW)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["000000.png", "000001.png"]  # no temporary left
    sampling.sample_to_folder(_tiny_sampler_model(), tmp_path, 4, batch_size=2, **SAMPLE_KW)
    assert len(list(tmp_path.glob("*.png"))) == 4


def test_a_teacher_cache_whose_bytes_changed_is_not_loaded(tmp_path, capsys):
    from harness.weights import load_cache, save_cache

    path = tmp_path / "teachers" / "abc.safetensors"
    save_cache(path, {"w": torch.arange(6.0)}, what="the teacher cache abc.safetensors")
    assert torch.equal(load_cache(path)["w"], torch.arange(6.0))
    _flip_last_byte(path)
    assert load_cache(path) is None
    assert "abc.safetensors: cache entry does not match its digest" in capsys.readouterr().err


def test_a_fifo_in_an_image_folder_data_set_is_refused_not_waited_on(tmp_path):
    from PIL import Image

    from harness_data import image_folder

    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
    os.mkfifo(tmp_path / "4.png")
    with pytest.raises(UserError, match=r"4.png' is a FIFO \(named pipe\); expected a regular file"):
        for split in ("train", "val"):  # the FIFO lands in one of them
            within(BOUND_S, image_folder, root=str(tmp_path), resolution=8, split=split, val_fraction=0.5)


@pytest.mark.slow  # two fresh Pythons importing torch (the CLI, its worker)
def test_a_full_disk_in_a_worker_process_is_one_line_too(tmp_path):
    """The process executor's worker writes the record: its full disk is the same one line."""
    import subprocess
    import sys

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\n"
        "def _full(fd):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "os.fsync = _full\n")
    suite = tmp_path / "disk.yaml"
    suite.write_text(TOY_SUITE.replace("[32, 48, 64]", "[32]"))
    results = tmp_path / "results"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), *filter(None, [os.environ.get("PYTHONPATH")])])}
    done = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--results", str(results),
                           "--executor", "process"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    line = _one_line(done.stderr)
    assert "no space left on device while writing the record" in line
    assert [p.name for p in (results / "disk").iterdir()] == []  # no record, no temporary, no claim
    assert main(["run", str(suite), "--results", str(results)]) == 0  # space freed: the rerun finishes
    assert [r["status"] for r in load_records(results / "disk")] == ["ok"]
