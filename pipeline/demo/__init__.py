"""The offline demo source: Fashion-MNIST images as a URL list with captions (source.py) served over loopback
HTTP (http_server.py). The one part of pipeline/ that train/experiments may import (its class names, captions)."""
