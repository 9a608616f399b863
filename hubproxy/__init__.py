"""hubproxy: a streaming, verified, single-flight caching proxy for TensorFlow Hub model archives.

Importing the package starts nothing and imports no server dependency: the proxy lives in its
subpackages, and use_mirror (the client's one line) imports its shim only when called.
"""

__version__ = "0.1.0"


def use_mirror(url: str | None = None) -> None:
    """Make tensorflow_hub fetch https://tfhub.dev/..., https://www.kaggle.com/models/... and
    https://hub.tensorflow.google.cn/... handles from the hubproxy mirror at url (default:
    $HUBPROXY_MIRROR), keeping each handle's TFHUB_CACHE_DIR entry. ValueError if there is no
    http(s) mirror URL.

    Example:
        import hubproxy, tensorflow_hub as hub
        hubproxy.use_mirror("http://mirror:8080")
        model = hub.load("https://tfhub.dev/google/imagenet/mobilenet_v2_100_224/classification/5")
    """
    from .shim import use_mirror as install

    install(url)
