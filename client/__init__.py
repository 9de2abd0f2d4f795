"""A light Python client for monaserve; imports no torch.

from monaserve.client import MonaClient

with MonaClient("http://127.0.0.1:8000") as client:
    print(client.classify("pets", "cat.jpg").best.label)
"""

from .client import DEFAULT_URL, AsyncMonaClient, MonaClient, RetryPolicy
from .errors import MonaConnectionError, MonaError, MonaServerError
from .results import ClassArea, Classification, Detection, Detections, LabelScore, Result, Segmentation

__all__ = [
    "DEFAULT_URL",
    "AsyncMonaClient",
    "ClassArea",
    "Classification",
    "Detection",
    "Detections",
    "LabelScore",
    "MonaClient",
    "MonaConnectionError",
    "MonaError",
    "MonaServerError",
    "Result",
    "RetryPolicy",
    "Segmentation",
]
