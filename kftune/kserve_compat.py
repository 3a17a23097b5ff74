"""Every use kftune makes of KServe's workings beyond its public API, in one place.

``kftune serve`` runs KServe's own ModelServer; three things it needs are not
covered by KServe 0.21's public API:

* importing ``kserve.model_server`` parses ``sys.argv`` with KServe's own flags
  and keeps them as ModelServer's defaults, so kftune's command line (or
  pytest's) must be hidden from that import (:func:`import_kserve`);
* ModelServer takes no listen address and its REST server hard-codes uvicorn's
  host to 0.0.0.0 (kserve/kserve#4558): :class:`ModelServer` sets the host on
  the REST server's uvicorn config in the ``setup_event_loop`` hook that
  ``start()`` calls after building it and before uvicorn binds;
* KServe's DataPlane answers a body it cannot decode with a 500 carrying the
  bytes: :class:`DataPlane` answers 400 with one line saying what to send.

tests/test_kserve_compat.py pins these to kserve 0.21.0 (the version
pyproject.toml allows); an upgrade that changes them fails there first.
"""

from __future__ import annotations

import struct
import sys

KSERVE_VERSION = "0.21.0"


def import_kserve():
    """Imports kserve with ``sys.argv`` hidden from ``kserve.model_server``'s import-time flag parsing."""
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        import kserve
        from kserve import model_server  # noqa: F401 - the import that parses sys.argv
    finally:
        sys.argv = argv
    return kserve


import_kserve()

from kserve import ModelServer as _KServeModelServer  # noqa: E402 - after the import above hid sys.argv
from kserve.constants.constants import PredictorProtocol  # noqa: E402
from kserve.errors import InferenceError, InvalidInput  # noqa: E402
from kserve.protocol.dataplane import DataPlane as _KServeDataPlane  # noqa: E402

V1_EXAMPLE = '{"instances": [{"image_bytes": {"b64": "<base64 of a JPEG>"}, "key": "optional"}]}'
V2_EXAMPLE = ('{"inputs": [{"name": "image_bytes", "datatype": "BYTES", "shape": [1], '
              '"data": ["<base64 of a JPEG>"]}]}')


class DataPlane(_KServeDataPlane):
    """KServe's DataPlane, with a body it cannot decode answered 400 in one line that says what to send.

    KServe 0.21 turns a BYTES tensor sent in the binary extension back into UTF-8 text
    (InferRequest.from_bytes), so raw image bytes fail there as an InferenceError (500, with the
    bytes in the message). Decoding only reads what the client sent: its errors are the client's.
    """

    def decode(self, body, headers, protocol_version: str = PredictorProtocol.REST_V1.value, model_name: str = None):
        try:
            return super().decode(body, headers, protocol_version, model_name)
        except InvalidInput as e:
            if not str(e).startswith("Unrecognized request format"):
                raise
            example = V2_EXAMPLE if protocol_version == PredictorProtocol.REST_V2.value else V1_EXAMPLE
            raise InvalidInput(f"the request body is not JSON ({str(e).split(': ', 1)[-1]}): send {example}") from None
        except (InferenceError, struct.error) as e:
            # struct.error: a binary tensor whose length prefixes say more than the body holds (KServe 0.21
            # lets it through as a 500).
            reason = ("its binary data holds bytes that are not UTF-8 text, which KServe hands on only as text"
                      if "UTF-8" in str(e) else str(e).splitlines()[0][:200])
            raise InvalidInput(f"the request's tensors cannot be decoded ({reason}): send each image as a base64 "
                               f"string, as in {V2_EXAMPLE}") from None


class ModelServer(_KServeModelServer):
    """KServe's ModelServer listening on ``host`` instead of every address, with :class:`DataPlane`.

    """

    def __init__(self, host: str, **kwargs):
        self.host = host
        super().__init__(**kwargs)
        # start() hands self.dataplane to the REST server it builds.
        self.dataplane = DataPlane(model_registry=self.registered_models)

    def setup_event_loop(self):
        # 0.21's RESTServer hard-codes uvicorn's host to 0.0.0.0 and ModelServer takes no host
        # (kserve/kserve#4558). start() builds the RESTServer, then calls this hook before uvicorn
        # binds, so the host is set on that server's uvicorn config here.
        self._rest_server.config.host = self.host
        super().setup_event_loop()
