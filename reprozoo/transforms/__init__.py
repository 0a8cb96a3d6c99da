"""Image transforms: the CIFAR-10-C corruptions (Hendrycks & Dietterich 2019), applied to real images."""

from reprozoo.transforms.corruptions import (
    BENCHMARK_CORRUPTIONS,
    CORRUPTIONS,
    EXTRA_CORRUPTIONS,
    SEVERITIES,
    available_corruptions,
    corrupt,
)

__all__ = [
    "BENCHMARK_CORRUPTIONS",
    "CORRUPTIONS",
    "EXTRA_CORRUPTIONS",
    "SEVERITIES",
    "available_corruptions",
    "corrupt",
]
