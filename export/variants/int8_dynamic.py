"""Variant `int8` (encoders, tensor models): dynamic quantisation with int8 weights per output
channel, activations quantised at run time. Per-channel, because per-tensor weights lose too
much on sentence encoders (all-MiniLM-L6-v2: min cosine 0.918 per-tensor against 0.986
per-channel). Decoders use weight-only int8 instead (their task overrides the entry).
Never imports torch."""

from __future__ import annotations

from pathlib import Path

from onnx import TensorProto

from appliance.export.tasks.base import Artifact
from appliance.export.variants.base import Variant, VariantContext, register_variant
from appliance.export.variants.common import quiet_root_logger, needs_external_data, pooling_node_names


@register_variant
class Int8Dynamic(Variant):
    name = "int8"
    quantization = "int8"
    def __init__(self, per_channel: bool = True) -> None:
        # The registry's entry is per-channel; the tests and the bench build a per-tensor one
        # to show that the budget refuses it.
        self.per_channel = per_channel

    def apply(self, reference: Artifact, out_dir: Path, ctx: VariantContext) -> Artifact:
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        graph = onnx.load(str(reference.model_path), load_external_data=False)
        excluded = pooling_node_names(graph)
        with quiet_root_logger():
            quantize_dynamic(
                reference.model_path,
                out_dir / reference.model_file,
                weight_type=QuantType.QInt8,
                per_channel=self.per_channel,
                nodes_to_exclude=excluded,
                use_external_data_format=needs_external_data(reference),
                extra_options={"DefaultTensorType": TensorProto.FLOAT},
            )
        return Artifact(
            directory=out_dir,
            variant=self.name,
            quantization=self.quantization,
            model_file=reference.model_file,
            details={
                "method": "dynamic int8",
                "weights": "int8 per-channel" if self.per_channel else "int8 per-tensor",
                "activations": "uint8, quantised at run time",
            },
        )
