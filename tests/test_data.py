"""Specification of advkit.data: named datasets, checked downloads, safe CIFAR-10 unpickling,
image folders and .npz files."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import shlex
import struct
import tarfile
import threading
import time
import warnings
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import advkit.data as data
from advkit.data import datasets
from advkit.data.download import ChecksumError, DownloadError, download
from advkit.data.idx import parse_idx, read_idx

# The real data, when this machine has it: $ADVKIT_DATA_DIR, else the workplace's shared/data
# beside the repository. Tests that need it are skipped elsewhere.
SHARED_DATA = Path(
    os.environ.get("ADVKIT_DATA_DIR") or Path(__file__).resolve().parents[2] / "shared" / "data"
)
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


# ---------------------------------------------------------------- fixtures and helpers


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Fresh cache, no inherited data dir, and a mirror nobody listens on, so that no test
    can reach the internet by accident."""
    monkeypatch.delenv(data.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv(data.MIRROR_ENV, "http://127.0.0.1:9")
    data.clear_cache()
    yield
    data.clear_cache()


class FileServer:
    """State of the test HTTP server: path -> bytes, and paths whose transfer is cut."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.cut: set[str] = set()
        self.stall: set[str] = set()
        self.requests: list[str] = []
        self.url = ""


@pytest.fixture
def server() -> Iterator[FileServer]:
    """A real HTTP server on 127.0.0.1 serving ``server.files``."""
    state = FileServer()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            state.requests.append(self.path)
            body = state.files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path in state.stall:
                time.sleep(1.0)  # longer than the client's timeout
                return
            if self.path in state.cut:
                # Announce the full length, send half, then hang up.
                self.wfile.write(body[: len(body) // 2])
                self.close_connection = True
                return
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    yield state
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def md5(blob: bytes) -> str:
    return hashlib.md5(blob).hexdigest()


def idx_gz(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return gzip.compress(header + array.astype(np.uint8).tobytes())


class Py2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way Python 2's cPickle wrote the CIFAR-10 batches: every string
    is an 8-bit STRING opcode and numpy is spelled ``numpy.core.multiarray``."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_str8(self, obj: bytes | str) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]) + raw)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)) + raw)
        self.memoize(obj)

    dispatch[bytes] = save_str8
    dispatch[str] = save_str8


def py2_pickle(obj: object) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def cifar_batch(rng: np.random.Generator, n: int) -> tuple[dict[bytes, object], np.ndarray]:
    images = rng.integers(0, 256, size=(n, 3, 32, 32), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n)
    batch = {
        b"batch_label": b"testing batch",
        b"labels": [int(v) for v in labels],
        b"data": images.reshape(n, 3072),
        b"filenames": [b"img_%d.png" % i for i in range(n)],
    }
    return batch, images


def cifar_tarball(blobs: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, blob in blobs.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return buffer.getvalue()


@pytest.fixture
def fashion(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """A tiny Fashion-MNIST test split: gz files by relative path, and its arrays."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(12, 28, 28), dtype=np.uint8)
    labels = np.arange(12, dtype=np.uint8) % 10
    files = {
        "fashion-mnist/t10k-images-idx3-ubyte.gz": idx_gz(images),
        "fashion-mnist/t10k-labels-idx1-ubyte.gz": idx_gz(labels),
    }
    for relpath, blob in files.items():
        monkeypatch.setitem(datasets.MD5S, relpath, md5(blob))
    return {"files": files, "images": images, "labels": labels}


def serve(server: FileServer, files: dict[str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """Publish ``files`` (relative path -> bytes) and make the server the data mirror."""
    server.files.update({f"/{relpath}": blob for relpath, blob in files.items()})
    monkeypatch.setenv(data.MIRROR_ENV, server.url)


def png_bytes(array: np.ndarray, format: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format)
    return buffer.getvalue()


# ---------------------------------------------------------------- MNIST (shipped)


def test_mnist_test_split_has_canonical_shape_dtype_range_and_label_counts() -> None:
    x, y = data.load("mnist")
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (10000,) and y.dtype == torch.int64
    assert x.min() == 0.0 and x.max() == 1.0
    assert abs(x.mean().item() - 0.1325) < 1e-3
    assert torch.bincount(y).tolist() == MNIST_TEST_COUNTS


def test_mnist_train_split_has_canonical_label_counts() -> None:
    x, y = data.load("mnist", split="train")
    assert x.shape == (60000, 1, 28, 28)
    assert torch.bincount(y).tolist() == MNIST_TRAIN_COUNTS


def test_limit_returns_the_first_samples_of_the_split() -> None:
    x_all, y_all = data.load("mnist")
    x, y = data.load("mnist", limit=7)
    assert x.shape == (7, 1, 28, 28) and y.shape == (7,)
    assert torch.equal(x, x_all[:7]) and torch.equal(y, y_all[:7])


def test_limit_beyond_the_split_returns_the_whole_split() -> None:
    x, y = data.load("mnist", limit=10**6)
    assert len(x) == len(y) == 10000


@pytest.mark.parametrize("limit", [None, 5])
def test_changing_returned_tensors_does_not_corrupt_the_cache(limit: int | None) -> None:
    x, y = data.load("mnist", limit=limit)
    x_copy, y_copy = x.clone(), y.clone()
    x.fill_(0.5)
    y.fill_(3)
    x_again, y_again = data.load("mnist", limit=limit)
    assert torch.equal(x_again, x_copy) and torch.equal(y_again, y_copy)
    assert x_again.data_ptr() != x.data_ptr() and y_again.data_ptr() != y.data_ptr()


def test_repeated_loads_decode_the_files_once(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[Path] = []

    def counting_read_idx(path: Path) -> np.ndarray:
        calls.append(Path(path))
        return read_idx(path)

    monkeypatch.setattr(datasets, "read_idx", counting_read_idx)
    data.load("mnist", limit=10)
    data.load("mnist", limit=20)
    data.load("mnist")
    assert len(calls) == 2  # images + labels, once


def test_mnist_with_wrong_md5_is_refused_with_a_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(datasets.MD5S, "mnist/t10k-labels-idx1-ubyte.gz", "0" * 32)
    with pytest.raises(ChecksumError, match="t10k-labels-idx1-ubyte.gz") as info:
        data.load("mnist")
    message = str(info.value)
    assert "0" * 32 in message and "ec29112dd5afa0611ce80d1b7f02629c" in message
    assert "reinstall" in message


def test_mnist_ignores_data_dir_and_never_downloads(tmp_path: Path) -> None:
    x, _ = data.load("mnist", limit=3, data_dir=tmp_path / "nothing-here", download=False)
    assert x.shape == (3, 1, 28, 28)
    assert not (tmp_path / "nothing-here").exists()


# ---------------------------------------------------------------- names and arguments


@pytest.mark.parametrize(
    ("kwargs", "pattern"),
    [
        ({"name": "imagenet"}, r"'imagenet'.*mnist, fashion-mnist, cifar10, cifar10-jpeg-lossy"),
        ({"name": "mnist", "split": "val"}, r"train, test \(got 'val'\)"),
        ({"name": "mnist", "limit": 0}, r"limit must be >= 1 .*\(got 0\)"),
        ({"name": "mnist", "limit": -3}, r"\(got -3\)"),
    ],
)
def test_bad_arguments_raise_value_error_naming_the_value(kwargs: dict, pattern: str) -> None:
    with pytest.raises(ValueError, match=pattern):
        data.load(**kwargs)


def test_names_are_case_and_underscore_insensitive() -> None:
    assert data.class_names("fashion_mnist") == data.class_names("Fashion-MNIST")
    assert data.load("MNIST", limit=2)[0].shape == (2, 1, 28, 28)


def test_class_names_and_counts_cover_every_dataset() -> None:
    assert data.DATASETS == ("mnist", "fashion-mnist", "cifar10", "cifar10-jpeg-lossy")
    for name in data.DATASETS:
        assert data.num_classes(name) == len(data.class_names(name)) == 10
    assert data.class_names("mnist")[7] == "7"
    assert data.class_names("fashion-mnist")[9] == "Ankle boot"
    assert data.class_names("cifar10")[:2] == ["airplane", "automobile"]
    with pytest.raises(ValueError, match="'svhn'"):
        data.class_names("svhn")


def test_data_dir_comes_from_argument_then_env_then_home_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data.resolve_data_dir() == tmp_path / "home" / ".cache" / "advkit" / "data"
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "env"))
    assert data.resolve_data_dir() == tmp_path / "env"
    assert data.resolve_data_dir(tmp_path / "arg") == tmp_path / "arg"


# ---------------------------------------------------------------- IDX format


def test_idx_reader_accepts_plain_and_gzipped_files(tmp_path: Path) -> None:
    array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "a.gz").write_bytes(idx_gz(array))
    (tmp_path / "a").write_bytes(gzip.decompress(idx_gz(array)))
    assert np.array_equal(read_idx(tmp_path / "a.gz"), array)
    assert np.array_equal(read_idx(tmp_path / "a"), array)


def test_idx_reader_rejects_truncated_and_foreign_data() -> None:
    good = gzip.decompress(idx_gz(np.zeros((2, 3), dtype=np.uint8)))
    with pytest.raises(ValueError, match=r"labels.bin has 15 bytes .* implies 18"):
        parse_idx(good[:-3], source="labels.bin")
    with pytest.raises(ValueError, match="not an IDX file"):
        parse_idx(b"PK\x03\x04rest", source="x.zip")


# ---------------------------------------------------------------- download()


def test_download_writes_the_verified_file_and_nothing_else(
    server: FileServer, tmp_path: Path
) -> None:
    blob = os.urandom(300_000)
    server.files["/blob.bin"] = blob
    dest = tmp_path / "sub" / "blob.bin"
    assert download(f"{server.url}/blob.bin", dest, md5(blob), progress=True) == dest
    assert dest.read_bytes() == blob
    assert os.listdir(dest.parent) == ["blob.bin"]


def test_download_with_md5_mismatch_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    blob = os.urandom(50_000)
    server.files["/blob.bin"] = blob[:-1] + bytes([blob[-1] ^ 1])  # one bit flipped
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="md5 mismatch") as info:
        download(f"{server.url}/blob.bin", dest, md5(blob), progress=False)
    message = str(info.value)
    assert md5(blob) in message and md5(server.files["/blob.bin"]) in message
    assert f"{server.url}/blob.bin" in message
    assert os.listdir(tmp_path) == []


def test_download_cut_midway_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    blob = os.urandom(400_000)
    server.files["/blob.bin"] = blob
    server.cut.add("/blob.bin")
    with pytest.raises(DownloadError, match="dropped"):
        download(f"{server.url}/blob.bin", tmp_path / "blob.bin", md5(blob), progress=False)
    assert os.listdir(tmp_path) == []


def test_stalled_server_times_out_and_leaves_nothing(server: FileServer, tmp_path: Path) -> None:
    server.files["/blob.bin"] = b"never sent"
    server.stall.add("/blob.bin")
    with pytest.raises(DownloadError, match="timed out"):
        download(f"{server.url}/blob.bin", tmp_path / "b", md5(b"x"), progress=False, timeout=0.2)
    assert os.listdir(tmp_path) == []


def test_failed_download_keeps_the_previous_file_intact(server: FileServer, tmp_path: Path) -> None:
    dest = tmp_path / "blob.bin"
    dest.write_bytes(b"previous content")
    server.files["/blob.bin"] = b"new content"
    with pytest.raises(DownloadError):
        download(f"{server.url}/blob.bin", dest, md5(b"other content"), progress=False)
    assert dest.read_bytes() == b"previous content"
    assert os.listdir(tmp_path) == ["blob.bin"]


def test_download_reports_http_errors_and_unreachable_hosts(
    server: FileServer, tmp_path: Path
) -> None:
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(f"{server.url}/missing.bin", tmp_path / "a", "0" * 32, progress=False)
    with pytest.raises(DownloadError, match="cannot connect"):
        download("http://127.0.0.1:9/a", tmp_path / "a", "0" * 32, progress=False)
    assert os.listdir(tmp_path) == []


def test_download_refuses_non_http_urls(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="file:///etc/passwd"):
        download("file:///etc/passwd", tmp_path / "a", "0" * 32)


# ---------------------------------------------------------------- Fashion-MNIST via mirror


def test_fashion_mnist_downloads_from_mirror_then_loads_offline(
    server: FileServer, fashion: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(server, fashion["files"], monkeypatch)
    x, y = data.load("fashion-mnist", data_dir=tmp_path)
    assert torch.equal(x, torch.from_numpy(fashion["images"][:, None]).float() / 255)
    assert y.tolist() == fashion["labels"].tolist()
    assert sorted(server.requests) == sorted(f"/{p}" for p in fashion["files"])
    for relpath, blob in fashion["files"].items():
        assert (tmp_path / relpath).read_bytes() == blob

    data.clear_cache()
    x_again, _ = data.load("fashion_mnist", data_dir=tmp_path, download=False)
    assert torch.equal(x_again, x)
    assert len(server.requests) == 2


def test_data_dir_env_variable_is_used(
    server: FileServer, fashion: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(server, fashion["files"], monkeypatch)
    monkeypatch.setenv(data.DATA_DIR_ENV, str(tmp_path / "from-env"))
    data.load("fashion-mnist", limit=1)
    assert (tmp_path / "from-env" / "fashion-mnist" / "t10k-images-idx3-ubyte.gz").is_file()


def test_missing_file_without_download_explains_the_options(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="download=True") as info:
        data.load("fashion-mnist", data_dir=tmp_path, download=False)
    assert str(tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz") in str(info.value)


def test_corrupt_download_leaves_the_data_dir_empty(
    server: FileServer, fashion: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = dict(fashion["files"])
    files["fashion-mnist/t10k-images-idx3-ubyte.gz"] = b"<html>captive portal</html>"
    serve(server, files, monkeypatch)
    with pytest.raises(DownloadError, match="md5 mismatch"):
        data.load("fashion-mnist", data_dir=tmp_path)
    assert os.listdir(tmp_path / "fashion-mnist") == []


def test_dropped_connection_leaves_the_data_dir_empty(
    server: FileServer, fashion: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(server, fashion["files"], monkeypatch)
    server.cut.add("/fashion-mnist/t10k-images-idx3-ubyte.gz")
    with pytest.raises(DownloadError, match="dropped"):
        data.load("fashion-mnist", data_dir=tmp_path)
    assert os.listdir(tmp_path / "fashion-mnist") == []


def test_corrupt_local_file_is_named_kept_and_not_redownloaded(
    server: FileServer, fashion: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve(server, fashion["files"], monkeypatch)
    local = tmp_path / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    local.parent.mkdir()
    local.write_bytes(b"half a file")
    with pytest.raises(ChecksumError, match="delete it") as info:
        data.load("fashion-mnist", data_dir=tmp_path)
    assert str(local) in str(info.value)
    assert local.read_bytes() == b"half a file"
    assert server.requests == []


@pytest.mark.skipif(
    not (SHARED_DATA / "fashion-mnist").is_dir(), reason=f"{SHARED_DATA} is not available"
)
def test_real_fashion_mnist_loads_from_the_shared_data_dir(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(data.DATA_DIR_ENV, str(SHARED_DATA))
    x, y = data.load("fashion-mnist", download=False)
    assert x.shape == (10000, 1, 28, 28) and x.dtype == torch.float32
    assert torch.bincount(y).tolist() == [1000] * 10
    assert abs(x.mean().item() - 0.2868) < 1e-3


# ---------------------------------------------------------------- CIFAR-10


def test_cifar10_tarball_downloads_and_decodes_python2_pickles(
    server: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rng = np.random.default_rng(1)
    batches = {f"data_batch_{i}": cifar_batch(rng, 2) for i in range(1, 6)}
    batches["test_batch"] = cifar_batch(rng, 3)
    blobs = {name: py2_pickle(batch) for name, (batch, _) in batches.items()}
    blobs["batches.meta"] = py2_pickle({b"label_names": [b"airplane"]})
    assert b"numpy.core.multiarray" in blobs["test_batch"]  # the spelling of the real files
    tarball = cifar_tarball(blobs)
    monkeypatch.setitem(datasets.MD5S, "cifar10/cifar-10-python.tar.gz", md5(tarball))
    serve(server, {"cifar10/cifar-10-python.tar.gz": tarball}, monkeypatch)

    x, y = data.load("cifar10", split="train", data_dir=tmp_path)
    expected = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert x.shape == (10, 3, 32, 32) and x.dtype == torch.float32
    assert torch.equal(x, torch.from_numpy(expected).float() / 255)
    assert y.tolist() == sum((batches[f"data_batch_{i}"][0][b"labels"] for i in range(1, 6)), [])

    x_test, y_test = data.load("cifar10", split="test", data_dir=tmp_path)
    assert torch.equal(x_test, torch.from_numpy(batches["test_batch"][1]).float() / 255)
    assert y_test.tolist() == batches["test_batch"][0][b"labels"]
    assert server.requests == ["/cifar10/cifar-10-python.tar.gz"]


def test_cifar10_reads_an_extracted_folder_without_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    batch, images = cifar_batch(np.random.default_rng(2), 4)
    blob = pickle.dumps(batch, protocol=4)  # numpy 2 spelling: numpy._core.multiarray
    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(blob)
    monkeypatch.setitem(datasets.MD5S, "cifar10/cifar-10-batches-py/test_batch", md5(blob))
    x, y = data.load("cifar10", data_dir=tmp_path, download=False)
    assert torch.equal(x, torch.from_numpy(images).float() / 255)
    assert y.tolist() == batch[b"labels"]


class ShellPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


class OpenPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("payload", [ShellPayload, OpenPayload])
def test_malicious_cifar10_pickle_is_refused_and_never_runs(
    payload: type, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": payload(marker), b"labels": [0]}, protocol=2)
    pickle.loads(blob)  # plain pickle does run it: the payload is real
    assert marker.exists()
    marker.unlink()

    folder = tmp_path / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    (folder / "test_batch").write_bytes(blob)
    monkeypatch.setitem(datasets.MD5S, "cifar10/cifar-10-batches-py/test_batch", md5(blob))
    with pytest.raises(pickle.UnpicklingError, match="refusing to load .*test_batch"):
        data.load("cifar10", data_dir=tmp_path, download=False)
    assert not marker.exists()


def test_malicious_pickle_inside_the_tarball_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "pwned"
    blob = pickle.dumps({b"data": OpenPayload(marker), b"labels": [0]}, protocol=2)
    tarball = cifar_tarball({"test_batch": blob})
    (tmp_path / "cifar10").mkdir()
    (tmp_path / "cifar10" / "cifar-10-python.tar.gz").write_bytes(tarball)
    monkeypatch.setitem(datasets.MD5S, "cifar10/cifar-10-python.tar.gz", md5(tarball))
    with pytest.raises(pickle.UnpicklingError, match="not a genuine CIFAR-10 file"):
        data.load("cifar10", data_dir=tmp_path, download=False)
    assert not marker.exists()


def test_cifar10_tarball_with_wrong_md5_is_not_unpickled(tmp_path: Path) -> None:
    (tmp_path / "cifar10").mkdir()
    tarball = tmp_path / "cifar10" / "cifar-10-python.tar.gz"
    tarball.write_bytes(cifar_tarball({"test_batch": b"anything"}))
    with pytest.raises(ChecksumError, match="c58f30108f718f92721af3b95e74349a"):
        data.load("cifar10", data_dir=tmp_path, download=False)


# ---------------------------------------------------------------- lossy CIFAR-10 JPEG copy


def test_lossy_cifar10_warns_and_interleaves_classes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for label, name in enumerate(data.class_names("cifar10")):
            for k in range(2):
                pixels = np.full((32, 32, 3), 20 * label + 10 * k, dtype=np.uint8)
                archive.writestr(f"test/{name}/{k:04d}.jpg", png_bytes(pixels, "JPEG"))
    zip_path = tmp_path / "cifar10-jpeg-lossy" / "cifar10_yoongikim_jpeg_q75.zip"
    zip_path.parent.mkdir()
    zip_path.write_bytes(buffer.getvalue())
    monkeypatch.setitem(datasets.MD5S, datasets._LOSSY_ZIP, md5(buffer.getvalue()))

    with pytest.warns(UserWarning, match="LOSSY"):
        x, y = data.load("cifar10-jpeg-lossy", data_dir=tmp_path)
    assert x.shape == (20, 3, 32, 32)
    assert y.tolist() == list(range(10)) * 2
    expected = torch.tensor([20 * (i % 10) + 10 * (i // 10) for i in range(20)]) / 255
    assert torch.allclose(x.mean(dim=(1, 2, 3)), expected, atol=2 / 255)


def test_lossy_cifar10_is_never_downloaded(server: FileServer, tmp_path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        with pytest.raises(FileNotFoundError, match="never downloaded"):
            data.load("cifar10-jpeg-lossy", data_dir=tmp_path, download=True)
    assert server.requests == []


@pytest.mark.skipif(
    not (SHARED_DATA / "cifar10-jpeg-lossy").is_dir(), reason=f"{SHARED_DATA} is not available"
)
def test_real_lossy_cifar10_test_split_loads_and_is_balanced() -> None:
    with pytest.warns(UserWarning, match="smoke tests"):
        x, y = data.load("cifar10-jpeg-lossy", limit=30, data_dir=SHARED_DATA)
    assert x.shape == (30, 3, 32, 32) and x.dtype == torch.float32
    assert y.tolist() == list(range(10)) * 3
    # Canonical test image 3 is the first airplane; the JPEG copy is close but not exact.
    reference = SHARED_DATA / "cifar10-test-first20-png" / "cifar10_03_0.png"
    if reference.is_file():
        exact = torch.from_numpy(np.array(Image.open(reference).convert("RGB")))
        error = (x[0] - exact.permute(2, 0, 1).float() / 255).abs().mean().item()
        assert 0 < error < 12 / 255


# ---------------------------------------------------------------- image folders


def make_folder(root: Path, images: dict[str, list[np.ndarray]], fmt: str = "PNG") -> None:
    for name, arrays in images.items():
        (root / name).mkdir(parents=True)
        for i, array in enumerate(arrays):
            suffix = ".png" if fmt == "PNG" else ".jpg"
            (root / name / f"{i:03d}{suffix}").write_bytes(png_bytes(array, fmt))


def test_image_folder_uses_sorted_folders_as_classes(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    dogs = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(2)]
    cats = [rng.integers(0, 256, (5, 6, 3), dtype=np.uint8)]
    make_folder(tmp_path, {"dog": dogs, "cat": cats})
    (tmp_path / "cat" / "notes.txt").write_text("not an image")
    (tmp_path / ".cache").mkdir()

    x, y, classes = data.load_image_folder(tmp_path)
    assert classes == ["cat", "dog"]
    assert y.tolist() == [0, 1, 1]
    assert x.shape == (3, 3, 5, 6) and x.dtype == torch.float32
    expected = np.stack(cats + dogs).transpose(0, 3, 1, 2) / 255
    assert torch.allclose(x, torch.from_numpy(expected).float())


def test_image_folder_resizes_and_converts_to_grayscale(tmp_path: Path) -> None:
    make_folder(
        tmp_path,
        {"a": [np.full((8, 8, 3), 200, np.uint8)], "b": [np.full((4, 10, 3), 50, np.uint8)]},
        fmt="JPEG",
    )
    x, y, _ = data.load_image_folder(tmp_path, size=(6, 7), grayscale=True)
    assert x.shape == (2, 1, 6, 7)
    assert abs(x[0].mean().item() - 200 / 255) < 3 / 255
    assert abs(x[1].mean().item() - 50 / 255) < 3 / 255


def test_image_folder_missing_or_without_classes_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.load_image_folder(tmp_path)


def test_image_folder_with_an_empty_class_names_it(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": [np.zeros((4, 4, 3), np.uint8)]})
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=r"class folder .*/b has no images"):
        data.load_image_folder(tmp_path)


def test_unreadable_image_is_named(tmp_path: Path) -> None:
    make_folder(tmp_path, {"a": [np.zeros((4, 4, 3), np.uint8)]})
    (tmp_path / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        data.load_image_folder(tmp_path)


def test_mixed_sizes_without_size_suggest_resizing(tmp_path: Path) -> None:
    make_folder(
        tmp_path, {"a": [np.zeros((4, 4, 3), np.uint8)], "b": [np.zeros((5, 4, 3), np.uint8)]}
    )
    with pytest.raises(ValueError, match=r"b/000.png is 5x4 .*size=\(height, width\)"):
        data.load_image_folder(tmp_path)
    assert data.load_image_folder(tmp_path, size=(4, 4))[0].shape == (2, 3, 4, 4)


# ---------------------------------------------------------------- .npz arrays


def test_npz_uint8_channels_last_becomes_nchw_in_unit_range(tmp_path: Path) -> None:
    x = np.random.default_rng(4).integers(0, 256, (5, 8, 9, 3), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", x=x, y=np.arange(5))
    images, labels = data.load_npz(tmp_path / "d.npz")
    assert images.shape == (5, 3, 8, 9) and images.dtype == torch.float32
    assert torch.equal(images, torch.from_numpy(x.transpose(0, 3, 1, 2)).float() / 255)
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 1, 2, 3, 4]


def test_npz_float_channels_first_and_plain_grayscale_are_kept(tmp_path: Path) -> None:
    x = np.random.default_rng(5).random((4, 1, 6, 6)).astype(np.float64)
    np.savez(tmp_path / "nchw.npz", x=x, y=np.zeros(4, np.int32))
    np.savez(tmp_path / "nhw.npz", x=x[:, 0], y=np.zeros(4, np.int32))
    for name in ("nchw.npz", "nhw.npz"):
        images, _ = data.load_npz(tmp_path / name)
        assert images.dtype == torch.float32
        assert torch.allclose(images, torch.from_numpy(x).float())


@pytest.mark.parametrize(
    ("arrays", "pattern"),
    [
        ({"x": np.zeros((2, 1, 4, 4), np.uint8)}, r"lacks array\(s\) y \(found: x\)"),
        ({"x": np.zeros((2, 16), np.uint8), "y": np.zeros(2, int)}, r"3 or 4 dimensions"),
        ({"x": np.zeros((2, 5, 4, 4), np.uint8), "y": np.zeros(2, int)}, r"no channel"),
        ({"x": np.full((2, 1, 4, 4), 2.0), "y": np.zeros(2, int)}, r"\[0, 1\].*divide by 255"),
        ({"x": np.full((2, 1, 4, 4), np.nan), "y": np.zeros(2, int)}, r"32 NaN or inf"),
        ({"x": np.zeros((2, 1, 4, 4), np.int64), "y": np.zeros(2, int)}, r"got int64"),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.zeros(3, int)}, r"2 images .* 3 labels"),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.eye(2, dtype=int)}, r"argmax"),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.array([0, -1])}, r"got -1"),
        ({"x": np.zeros((2, 1, 4, 4), np.uint8), "y": np.array([0.0, 1.0])}, r"float64"),
    ],
)
def test_npz_bad_content_is_refused_with_the_reason(
    arrays: dict[str, np.ndarray], pattern: str, tmp_path: Path
) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match=pattern):
        data.load_npz(tmp_path / "bad.npz")


def test_npz_object_arrays_are_refused_without_unpickling(tmp_path: Path) -> None:
    np.savez(tmp_path / "obj.npz", x=np.array([{"a": 1}], dtype=object), y=np.zeros(1, int))
    with pytest.raises(ValueError, match="object arrays"):
        data.load_npz(tmp_path / "obj.npz")


def test_npz_missing_or_not_npz_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.load_npz(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable .npz"):
        data.load_npz(tmp_path / "junk.npz")
