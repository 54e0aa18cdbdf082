"""The small pure parts of the decoder export: untying, recipes, KV-name reading, perplexity
arithmetic, the reference BPE and the shipped evaluation data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.errors import ExportError
from appliance.export.llm.eval_data import load_prompts, load_prose, render_chat
from appliance.export.llm.evaluation import prefix_match
from appliance.export.llm.graph_facts import _kv_templates, eos_ids_from, sampling_defaults
from appliance.export.llm.onnx_decoder import negative_log_likelihood, window_spans
from appliance.export.llm.quantize import WeightOnlyRecipe, find_embedding, find_lm_head, fold_constant_transposes
from appliance.export.llm.routes import route_for
from appliance.export.tasks.base import DATA_DIR


def _tied_graph() -> onnx.ModelProto:
    """input_ids -> Gather(Transpose(W)) -> MatMul(W) -> logits: a tied embedding."""
    weight = numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "lm_head.weight")
    nodes = [
        helper.make_node("Transpose", ["lm_head.weight"], ["embed.T"], name="/model/embed_tokens/Transpose"),
        helper.make_node("Gather", ["embed.T", "input_ids"], ["hidden"], name="/model/embed_tokens/Gather"),
        helper.make_node("MatMul", ["hidden", "lm_head.weight"], ["logits"], name="/lm_head/MatMul"),
    ]
    graph = helper.make_graph(
        nodes,
        "tied",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "s", 4])],
        [weight],
    )
    return helper.make_model(graph)


def test_folding_a_constant_transpose_unties_the_embedding() -> None:
    model = _tied_graph()
    folded = fold_constant_transposes(model)
    assert folded == ["embed.T"]
    assert [node.op_type for node in model.graph.node] == ["Gather", "MatMul"]
    initializers = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    np.testing.assert_array_equal(initializers["embed.T"], initializers["lm_head.weight"].T)
    assert find_lm_head(model).name == "/lm_head/MatMul"
    embedding = find_embedding(model)
    assert embedding is not None and embedding.input[0] == "embed.T"


@pytest.mark.parametrize("block_size", [8, 48, 512])
def test_recipe_refuses_block_sizes_matmulnbits_cannot_use(block_size: int) -> None:
    with pytest.raises(ExportError) as caught:
        WeightOnlyRecipe(bits=4, block_size=block_size)
    assert caught.value.field == "block_size"


def test_recipe_refuses_unsupported_bit_widths() -> None:
    with pytest.raises(ExportError, match="4 or 8"):
        WeightOnlyRecipe(bits=3)
    with pytest.raises(ExportError, match="embedding"):
        WeightOnlyRecipe(bits=4, embedding_bits=8)


def test_kv_names_are_read_from_the_graph_with_a_layer_placeholder() -> None:
    names = ["input_ids", "past_key_values.0.key", "past_key_values.1.key", "past_key_values.0.value", "past_key_values.1.value"]
    assert _kv_templates(names, "past") == ("past_key_values.{layer}.key", "past_key_values.{layer}.value", 2)
    with pytest.raises(ExportError, match="layers 0..n-1"):
        _kv_templates(["past.0.key", "past.2.key", "past.0.value", "past.2.value"], "past")


def test_eos_ids_and_sampling_defaults_come_from_the_generation_config() -> None:
    assert eos_ids_from([2, 0], 2, None) == [2, 0]
    assert sampling_defaults({"temperature": 0.6, "top_p": None, "max_length": 20}) == {"temperature": 0.6}


def test_perplexity_windows_cover_the_text_without_overlap() -> None:
    assert window_spans(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_spans(9, 4) == [(0, 4), (4, 8)]  # a 1-token tail scores nothing


def test_negative_log_likelihood_of_a_uniform_model_is_log_vocab() -> None:
    logits = np.zeros((5, 8))
    nll, count = negative_log_likelihood(logits, [1, 2, 3, 4, 5])
    assert count == 4
    assert nll / count == pytest.approx(np.log(8))


def test_prefix_match_stops_at_the_first_difference() -> None:
    assert prefix_match([1, 2, 3, 4], [1, 2, 9, 4], 32) == 2
    assert prefix_match([1, 2, 3], [1, 2, 3], 2) == 2


def test_route_sends_llama_to_the_builder_and_gpt2_to_optimum() -> None:
    assert route_for(["LlamaForCausalLM"]) == "genai"
    assert route_for(["GPT2LMHeadModel"]) == "optimum"
    with pytest.raises(ExportError, match="BertModel is not supported"):
        route_for(["BertModel"])


def test_shipped_prose_and_prompts_are_there_and_grounded() -> None:
    prose = load_prose(DATA_DIR)
    assert len(prose.split()) > 2000
    prompts = load_prompts(DATA_DIR)
    assert len(prompts) == 8
    grounded = [prompt for prompt in prompts if prompt.kind == "grounded"]
    assert len(grounded) >= 3
    assert all(len(prompt.messages[-1]["content"].split()) > 200 for prompt in grounded)


def test_chat_rendering_refuses_a_template_that_raises() -> None:
    template = "{{ raise_exception('only user messages') }}"
    with pytest.raises(ExportError, match="only user messages") as caught:
        render_chat(template, [{"role": "user", "content": "hi"}], {})
    assert caught.value.field == "chat_template"


def test_promoted_layers_follow_the_mixed_rule() -> None:
    from appliance.export.llm.quantize import promoted_layer_indices

    assert sorted(promoted_layer_indices(30, "mixed")) == [0, 1, 2, 3, 6, 9, 12, 15, 18, 21, 24, 27, 28, 29]
    assert promoted_layer_indices(2, "all") == {0, 1}


def test_large_models_decode_fewer_greedy_prompts_spread_over_the_set() -> None:
    from appliance.export.llm.evaluation import GREEDY_FULL_SET_MAX_BYTES, MIN_GREEDY_PROMPTS, greedy_prompt_count, spread

    assert greedy_prompt_count(GREEDY_FULL_SET_MAX_BYTES, 8) == 8
    assert greedy_prompt_count(2 * GREEDY_FULL_SET_MAX_BYTES, 8) == 4
    assert greedy_prompt_count(100 * GREEDY_FULL_SET_MAX_BYTES, 8) == MIN_GREEDY_PROMPTS
    assert greedy_prompt_count(100 * GREEDY_FULL_SET_MAX_BYTES, 2) == 2
    prompts = [[n] for n in range(8)]
    assert spread(prompts, 3) == [[0], [4], [7]]
    assert spread(prompts, 8) == prompts
