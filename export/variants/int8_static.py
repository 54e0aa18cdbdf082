"""Variant `int8-static`: QDQ quantisation with activation ranges calibrated on data the task
provides (shipped sentences for encoders, a user's .npz for tensor models). Only MatMul and Gemm
are quantised: they carry the weights and the time, while quantising Softmax, LayerNorm or
Add costs accuracy for no speed on CPU. Never imports torch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from appliance.errors import ExportError
from appliance.export.tasks.base import Artifact
from appliance.export.variants.base import Variant, VariantContext, register_variant
from appliance.export.variants.common import quiet_root_logger, needs_external_data, pooling_node_names

QUANTISED_OPS: tuple[str, ...] = ("MatMul", "Gemm", "Conv")


class _FeedReader:
    """onnxruntime's CalibrationDataReader protocol over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]) -> None:
        self._feeds: Iterator[dict[str, np.ndarray]] = iter(feeds)

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)

    def rewind(self) -> None:  # part of the protocol; one pass is all calibration needs
        return None


@register_variant
class Int8Static(Variant):
    name = "int8-static"
    quantization = "int8-static"

    def apply(self, reference: Artifact, out_dir: Path, ctx: VariantContext) -> Artifact:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        feeds = ctx.calibration()
        if not feeds:
            raise ExportError("calibration: no calibration inputs", field="calibration")
        graph = onnx.load(str(reference.model_path), load_external_data=False)
        excluded = pooling_node_names(graph)
        try:
            with quiet_root_logger():
                quantize_static(
                    reference.model_path,
                    out_dir / reference.model_file,
                    _FeedReader(feeds),
                    quant_format=QuantFormat.QDQ,
                    op_types_to_quantize=list(QUANTISED_OPS),
                    per_channel=True,
                    activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8,
                    nodes_to_exclude=excluded,
                    use_external_data_format=needs_external_data(reference),
                    calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
                )
        except (ValueError, KeyError) as exc:
            raise ExportError(f"calibration: the inputs do not fit the model ({exc})", field="calibration") from None
        return Artifact(
            directory=out_dir,
            variant=self.name,
            quantization=self.quantization,
            model_file=reference.model_file,
            details={
                "method": "static QDQ int8, MinMax calibration",
                "ops": list(QUANTISED_OPS),
                "calibration_batches": len(feeds),
                "weights": "int8 per-channel, symmetric",
                "activations": "uint8, asymmetric",
            },
        )
