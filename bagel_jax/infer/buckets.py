"""Static shape buckets for compiled inference, and the errors for inputs beyond the limits.

Every compiled inference call has static shapes. Sizes that vary per call (context tokens, ViT patches, images,
requests in a batch, generated tokens) are rounded up to a few buckets so that a new prompt length reuses a
compiled program: sizes up to ``minimum`` take ``minimum``; above it, a size in (2^k, 2^(k+1)] is rounded up to a
multiple of 2^k / 4 (at most 25 % padding, four buckets per octave). Request counts use powers of two.

The limit errors are ``InputError``s (``ValueError``s): a command-line program reports them as one line.
"""

from __future__ import annotations

from bagel_jax.cli import InputError

DEFAULT_MAX_BATCH = 64  # requests per compiled call (larger batches run in pieces)
DEFAULT_MAX_CONTEXT_TOKENS = 16384  # KV cache limit: a context + the tokens generated after it


class InferenceLimitError(InputError):
    """An input beyond a static limit of the inference programs; the message names the limit."""


class CacheOverflowError(InferenceLimitError):
    """A context (plus the tokens to generate) longer than the KV cache may hold."""


class ImageTooLargeError(InferenceLimitError):
    """An image larger than the model's position tables cover."""


class BatchTooLargeError(InferenceLimitError):
    """More requests in one compiled call than the largest batch bucket."""


def round_bucket(n: int, minimum: int = 16) -> int:
    """The bucket of size ``n`` (>= n): ``minimum`` up to it, then four buckets per octave."""
    n = int(n)
    if n <= minimum:
        return minimum
    octave = 1 << ((n - 1).bit_length() - 1)  # the largest power of two < n
    step = max(minimum, octave // 4)
    return -(-n // step) * step


def batch_bucket(n: int, limit: int) -> int:
    """The power of two >= ``n`` (capped at ``limit``); ``n > limit`` raises ``BatchTooLargeError``."""
    if n < 1:
        raise ValueError(f"a batch needs at least one request, got {n}")
    if n > limit:
        raise BatchTooLargeError(f"batch of {n} requests exceeds the batch bucket limit max_batch={limit}")
    return min(limit, 1 << (n - 1).bit_length())


def chunks(n: int, size: int) -> list[range]:
    """``range(n)`` cut into consecutive pieces of at most ``size``."""
    return [range(i, min(n, i + size)) for i in range(0, n, size)]
