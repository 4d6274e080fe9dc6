"""Whether the Hugging Face hub can be reached, asked once per process.

Offline, `huggingface_hub` and `datasets` retry for 30-50 s before they fail; a 3-second connection test first lets
a missing model or dataset get its one-line error at once, and lets cached hub models load without the network.
"""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse


@functools.cache
def hub_reachable(timeout_s: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False
