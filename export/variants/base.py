"""The variant registry: each quantisation / precision variant is one small class keyed by the
name users type after --quant (fp16, int8, int8-static, int4; fp32 is the reference itself and
`auto` is resolved per task by `TaskExporter.auto_variant`).

A variant reads an fp32 `Artifact` and writes a new one into `out_dir`. It must not modify its
input, must keep the graph's inputs and outputs (names and fp32 io), and reports what it did in
`Artifact.details` (for report.json). Tasks that need another recipe for the same name (decoders'
weight-only int8) override `TaskExporter.make_variant` instead of changing the entry here.
Never imports torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from appliance.errors import ExportError
from appliance.export.sources.base import load_builtin_modules
from appliance.export.tasks.base import Artifact
from appliance.repository.manifest import Quantization


@dataclass
class VariantContext:
    """What a variant may ask of the task it runs for."""

    task: str
    provider: str
    #: Returns calibration feeds (a list of input dicts); raises ExportError when the task
    #: has none. Called only by variants that calibrate.
    calibration: Callable[[], list[dict[str, np.ndarray]]]


class Variant(ABC):
    """One entry of the registry."""

    name: ClassVar[str]
    quantization: ClassVar[Quantization]

    @abstractmethod
    def apply(self, reference: Artifact, out_dir: Path, ctx: VariantContext) -> Artifact:
        """Write the variant of `reference` into `out_dir` and describe it."""


_VARIANTS: dict[str, Variant] = {}

BUILTIN_VARIANT_MODULES: tuple[str, ...] = (
    "appliance.export.variants.fp16",
    "appliance.export.variants.int8_dynamic",
    "appliance.export.variants.int8_static",
    "appliance.export.variants.int4",
)


def register_variant(cls: type[Variant]) -> type[Variant]:
    """Class decorator: add a variant under its `name`."""
    _VARIANTS[cls.name] = cls()
    return cls


def registered_variants() -> dict[str, Variant]:
    load_builtin_modules(BUILTIN_VARIANT_MODULES)
    return dict(_VARIANTS)


def get_variant(name: str) -> Variant:
    variants = registered_variants()
    try:
        return variants[name]
    except KeyError:
        raise ExportError(
            f"quant: unknown variant {name!r}; known: {', '.join(['fp32', *sorted(variants), 'auto'])}",
            field="quant",
        ) from None


#: Every name --quant accepts (the CLI validates against this before any work).
QUANT_CHOICES: tuple[str, ...] = ("fp32", "fp16", "int8", "int8-static", "int4", "int4-exact", "auto")
