"""The real kagglehub client, as a user runs it: `python tests/kagglehub_client.py HANDLE`.

KAGGLEHUB_CACHE, credentials and proxies come from the environment. Prints, as JSON on the last
line of stdout, where the model landed and the md5 of every file under it (paths relative to it);
exits non-zero (with the exception on stderr) if the download fails.
"""

import hashlib
import json
import os
import sys

import kagglehub

root = kagglehub.model_download(sys.argv[1])
files = {}
for folder, _, names in os.walk(root):
    for name in names:
        path = os.path.join(folder, name)
        with open(path, "rb") as fh:
            files[os.path.relpath(path, root)] = hashlib.md5(fh.read()).hexdigest()
print(json.dumps({"path": root, "files": files}))
