"""bench/pretrained.py: nsfwjs's 8-bit tensors read back in manifest order, and a wrong tarball refused.

The conversion of the real package was checked once against TensorFlow.js running the package's own model
(docs/benchmarks.md); these tests hold the parsing to the package's layout without fetching 25 MB.
"""

import base64
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import pretrained  # noqa: E402


def package(path: Path, entries: list[tuple[str, list[int], float, float]], data: bytes) -> Path:
    """A tarball laid out as nsfwjs 4.4.0's: the manifest and the base64 shard inside minified JavaScript."""
    manifest = ",".join(f'{{name:"{n}",shape:[{",".join(map(str, s))}],dtype:"float32",quantization:'
                        f'{{min:{low},scale:{scale},dtype:"uint8"}}}}' for n, s, low, scale in entries)
    files = {pretrained.MODEL: f'a.exports={{modelTopology:{{}},weightsManifest:[{{paths:["x"],weights:[{manifest}]}}]}}',
             pretrained.SHARD: f'!function(e){{}}({{1:[function(e,h,n){{h.exports="{base64.b64encode(data).decode()}"}},{{}}]}})'}
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            blob = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path


def test_each_tensor_is_min_plus_scale_times_its_bytes_in_manifest_order(tmp_path):
    data = bytes([0, 1, 2, 255, 10, 20, 30])
    path = package(tmp_path / "p.tgz", [("Conv1/kernel", [2, 2], -1.0, 0.5), ("bn_Conv1/gamma", [3], .25, .01)], data)
    values = pretrained.tensors(path)
    np.testing.assert_allclose(values["Conv1/kernel"], [[-1.0, -0.5], [0.0, 126.5]])
    np.testing.assert_allclose(values["bn_Conv1/gamma"], [0.35, 0.45, 0.55], rtol=1e-6)


def test_a_shard_that_is_not_what_the_manifest_names_is_refused(tmp_path):
    path = package(tmp_path / "p.tgz", [("Conv1/kernel", [2, 2], 0.0, 1.0)], bytes(5))
    with pytest.raises(SystemExit, match="the manifest names 4 bytes of weights, the shard holds 5"):
        pretrained.tensors(path)


def test_a_cached_tarball_that_is_not_npms_is_refused_before_it_is_read(tmp_path):
    package(tmp_path / "nsfwjs-4.4.0.tgz", [("Conv1/kernel", [1], 0.0, 1.0)], bytes(1))
    with pytest.raises(SystemExit, match="is not npm's nsfwjs@4.4.0 .its sha512 differs.; delete it"):
        pretrained.tarball(tmp_path)
