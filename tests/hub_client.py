"""The real tensorflow_hub client, as a user runs it: `python tests/hub_client.py HANDLE`.

TFHUB_CACHE_DIR comes from the environment. Prints the model's output for [1.0, 2.0] as JSON
on the last line of stdout; exits non-zero (with the exception on stderr) if loading fails.
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402
import tensorflow_hub as hub  # noqa: E402

model = hub.load(sys.argv[1])
print(json.dumps([float(v) for v in model(tf.constant([1.0, 2.0])).numpy()]))
