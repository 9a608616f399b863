"""Build tiny real SavedModels as hub archives (.tar.gz), at test time, with TensorFlow.

Run as a program so TensorFlow loads in its own process:
    python tests/savedmodels.py OUT_DIR NAME=MULTIPLIER[:PAD_MIB] ...
Each model computes `x * MULTIPLIER + 1.0`; OUT_DIR/NAME.tar.gz holds it like hub archives do
(members relative to the model root: saved_model.pb, variables/...). PAD_MIB adds two random,
incompressible asset files of that many MiB each as the LAST members, so an archive cut between
them still extracts to a loadable model: the hazard tensorflow_hub cannot detect by itself.
"""

import os
import sys
import tarfile
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def build(out_dir: str, name: str, multiplier: float, pad_mib: float = 0) -> str:
    import tensorflow as tf

    class Scale(tf.Module):
        def __init__(self):
            super().__init__()
            self.k = tf.Variable(multiplier, dtype=tf.float32)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.float32)])
        def __call__(self, x):
            return x * self.k + 1.0

    with tempfile.TemporaryDirectory() as model_dir:
        tf.saved_model.save(Scale(), model_dir)
        for pad in ("pad-a.bin", "pad-b.bin") if pad_mib else ():
            with open(os.path.join(model_dir, "assets", pad), "wb") as f:
                f.write(os.urandom(int(pad_mib * 1024 * 1024)))
        archive = os.path.join(out_dir, f"{name}.tar.gz")
        with tarfile.open(archive, "w:gz") as tar:
            for entry in sorted(os.listdir(model_dir), key=lambda e: (e == "assets", e)):
                tar.add(os.path.join(model_dir, entry), arcname=entry)
    return archive


if __name__ == "__main__":
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    for spec in sys.argv[2:]:
        name, _, value = spec.partition("=")
        multiplier, _, pad = value.partition(":")
        print(build(out, name, float(multiplier), float(pad or 0)))
