"""``python -m kftune.search FD``: a worker's trial process (:class:`kftune.search.worker.TrialProcess`)."""

import sys

from kftune.search.worker import _serve

sys.exit(_serve(int(sys.argv[1])))
