"""Variant `fp16`: weights and activations in float16 for GPU providers; inputs and outputs stay
fp32 so clients and the manifest do not change. Never imports torch."""

from __future__ import annotations

from pathlib import Path

import onnx

from appliance.export.tasks.base import Artifact
from appliance.export.variants.base import Variant, VariantContext, register_variant
from appliance.export.variants.common import needs_external_data, pooling_node_names, save_model


@register_variant
class Fp16(Variant):
    name = "fp16"
    quantization = "fp16"

    def apply(self, reference: Artifact, out_dir: Path, ctx: VariantContext) -> Artifact:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = onnx.load(str(reference.model_path))
        blocked = pooling_node_names(model)
        converted = convert_float_to_float16(model, keep_io_types=True, node_block_list=blocked)
        save_model(converted, out_dir, reference.model_file, needs_external_data(reference))
        return Artifact(
            directory=out_dir,
            variant=self.name,
            quantization=self.quantization,
            model_file=reference.model_file,
            details={"method": "float16 conversion, fp32 io", "kept_fp32_nodes": len(blocked)},
            notes=["fp16 is meant for GPU providers; on CPU it runs through casts and is slower"],
        )
