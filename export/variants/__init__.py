"""Quantisation and precision variants, one small class per name (see base.py)."""

from appliance.export.variants.base import (
    QUANT_CHOICES,
    Variant,
    VariantContext,
    get_variant,
    register_variant,
    registered_variants,
)

__all__ = ["QUANT_CHOICES", "Variant", "VariantContext", "get_variant", "register_variant", "registered_variants"]
