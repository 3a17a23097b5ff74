"""kftune.kserve_compat against the KServe it was written for: the workings beyond KServe's public API it relies on."""

import inspect
import sys
from importlib.metadata import version

from kftune import kserve_compat


def test_pinned_to_the_kserve_it_was_written_for():
    assert version("kserve") == kserve_compat.KSERVE_VERSION


def test_kserve_still_parses_argv_when_imported_and_the_import_hides_ours(monkeypatch):
    from kserve import model_server

    # The reason import_kserve exists: the module-level parser of ModelServer's defaults.
    assert hasattr(model_server, "parser") and hasattr(model_server, "args")
    monkeypatch.setattr(sys, "argv", ["kftune", "serve", "--port", "9", "--no-such-kserve-flag"])
    assert kserve_compat.import_kserve().ModelServer is kserve_compat._KServeModelServer
    assert sys.argv == ["kftune", "serve", "--port", "9", "--no-such-kserve-flag"]


def test_the_hook_that_sets_the_host_runs_after_the_rest_server_is_built_and_before_it_binds():
    from kserve import ModelServer
    from kserve.protocol.rest.server import RESTServer

    start = inspect.getsource(ModelServer.start)
    assert start.index("self._rest_server = ") < start.index("self.setup_event_loop()")
    # RESTServer keeps its uvicorn config (whose host the hook sets) as `config`.
    assert "self.config = uvicorn.Config(" in inspect.getsource(RESTServer.__init__)
    assert "self.dataplane" in start  # start() hands our DataPlane to the REST server it builds


def test_the_dataplane_answers_an_undecodable_body_400_with_what_to_send():
    import pytest
    from kserve.model_repository import ModelRepository

    plane = kserve_compat.DataPlane(model_registry=ModelRepository())
    # V1: KServe's "Unrecognized request format" becomes kftune's line with the request to send.
    with pytest.raises(kserve_compat.InvalidInput, match=r"^the request body is not JSON .*: send \{\"instances\""):
        plane.decode(b"{not json", {"content-type": "application/json"}, "v1", "m")
    # V2 binary extension: KServe's 500 on bytes that are not UTF-8 becomes a 400 saying to send base64.
    jpeg_start = b"\xff\xd8\xff\xe0"
    tensor = len(jpeg_start).to_bytes(4, "little") + jpeg_start  # BYTES in the binary extension: length, then bytes
    for binary in (tensor, tensor[:6]):  # well formed; cut short (its length says more than is there)
        body = (b'{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], "parameters": '
                b'{"binary_data_size": %d}}]}' % len(binary))
        headers = {"content-type": "application/json", "inference-header-content-length": str(len(body))}
        with pytest.raises(kserve_compat.InvalidInput, match=r"^the request's tensors cannot be decoded .*: send "
                                                             r"each image as a base64 string"):
            plane.decode(body + binary, headers, "v2", "m")
