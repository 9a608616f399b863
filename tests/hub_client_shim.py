"""The real tensorflow_hub client with hubproxy's one-line shim: `python tests/hub_client_shim.py HANDLE [MIRROR...]`.

Calls hubproxy.use_mirror(MIRROR) once per MIRROR given, in order (hubproxy.use_mirror() once, reading
HUBPROXY_MIRROR, when none is), then hub.load(HANDLE). TFHUB_CACHE_DIR comes from the environment. Prints
the model's output for [1.0, 2.0] as JSON on the last line of stdout; exits non-zero (with the exception on
stderr) if loading fails.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import hubproxy  # noqa: E402

handle, mirrors = sys.argv[1], sys.argv[2:]
for mirror in mirrors or [None]:
    hubproxy.use_mirror(mirror)

import tensorflow as tf  # noqa: E402
import tensorflow_hub as hub  # noqa: E402

model = hub.load(handle)
print(json.dumps([float(v) for v in model(tf.constant([1.0, 2.0])).numpy()]))
