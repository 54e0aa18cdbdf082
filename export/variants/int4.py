"""Variant `int4`: weight-only 4-bit MatMulNBits (blocks of INT4_BLOCK_SIZE, symmetric,
accuracy_level 4 = int8 compute, the fast CPU path). Activations stay float. The generic entry
quantises every MatMul with a constant weight; decoders override it with their own recipe
(tied LM head, builder graph). Never imports torch."""

from __future__ import annotations

from pathlib import Path

from appliance.export.tasks.base import Artifact
from appliance.export.variants.base import Variant, VariantContext, register_variant
from appliance.export.variants.common import quiet_root_logger, needs_external_data, save_model

INT4_BLOCK_SIZE = 32
#: accuracy_level 4 computes in int8; 0 (fp32 compute) measured several times slower on CPU.
INT4_ACCURACY_LEVEL = 4


@register_variant
class Int4(Variant):
    name = "int4"
    quantization = "int4"

    def apply(self, reference: Artifact, out_dir: Path, ctx: VariantContext) -> Artifact:
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        model = onnx.load(str(reference.model_path))
        quantizer = MatMulNBitsQuantizer(
            model, block_size=INT4_BLOCK_SIZE, is_symmetric=True, accuracy_level=INT4_ACCURACY_LEVEL
        )
        with quiet_root_logger():
            quantizer.process()
        quantised = quantizer.model.model
        count = sum(1 for node in quantised.graph.node if node.op_type == "MatMulNBits")
        save_model(quantised, out_dir, reference.model_file, needs_external_data(reference))
        return Artifact(
            directory=out_dir,
            variant=self.name,
            quantization=self.quantization,
            model_file=reference.model_file,
            details={
                "method": "weight-only int4 MatMulNBits",
                "block_size": INT4_BLOCK_SIZE,
                "accuracy_level": INT4_ACCURACY_LEVEL,
                "quantised_matmuls": count,
            },
        )
