"""The KV-cache choice of a generation export, in one place for the two sides that offer it:
`appliance export --kv-cache` (the export stage) and the admin's export form, which may not
import the export stage (ARCHITECTURE.md) but must refuse the same requests in the same words,
before a job starts rather than in its log."""

from __future__ import annotations

#: `--kv-cache` values; the first is the default: int8 rounds what every decode step reads and
#: costs export time (calibration and its check), and a 2-core box runs out of compute before
#: it runs out of fp32 KV memory at the sizes it serves, so int8 is asked for, never assumed.
KV_CACHE_CHOICES: tuple[str, ...] = ("fp32", "int8")
DEFAULT_KV_CACHE = KV_CACHE_CHOICES[0]
#: Generation variants that can carry an int8 cache: the weight-quantised ones (fp32 and fp16
#: variants promise the reference's numbers, which a quantised cache would break).
INT8_KV_VARIANTS: tuple[str, ...] = ("int4", "int8", "int4-exact")


def kv_cache_mismatch(kv_cache: str, task: str, variant: str, int8_variants: tuple[str, ...]) -> str | None:
    """Why `kv_cache` does not fit `variant` of `task` (whose int8-capable variants are
    `int8_variants`: none for tasks without a KV cache), without the field name; None if it fits."""
    if kv_cache not in KV_CACHE_CHOICES:
        return f"{kv_cache!r} is not one of {', '.join(KV_CACHE_CHOICES)}"
    if kv_cache == DEFAULT_KV_CACHE or variant in int8_variants:
        return None
    subject = " ".join(part for part in (task, variant) if part)
    return f"int8 applies to a decoder's {' / '.join(INT8_KV_VARIANTS)} variants, not to {subject}"
