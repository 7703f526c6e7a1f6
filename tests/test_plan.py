"""The memory planner: parameter counts against real models, the 4-bit weight arithmetic against bitsandbytes,
and the verdicts the report prints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from phi2sum import plan
from phi2sum.config import load_config
from phi2sum.errors import ConfigError

SEED = "phi2-xsum-t4"
SHARED_PHI2 = Path(__file__).resolve().parents[2] / "shared" / "models" / "phi-2" / "config.json"
PHI2_PARAMETERS = 2_779_683_840


def _meta_model_parameters(config) -> int:
    from transformers import PhiForCausalLM

    with torch.device("meta"):
        model = PhiForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("extra", [
    {},
    {"tie_word_embeddings": True},
    {"num_key_value_heads": 2, "qk_layernorm": True},
])
def test_parameter_count_equals_a_real_model(extra):
    from transformers import PhiConfig

    config = PhiConfig(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                       num_attention_heads=4, **extra)
    assert plan.ModelShape.from_config(config).num_parameters() == _meta_model_parameters(config)


@pytest.mark.parametrize("family, extra", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True, "num_key_value_heads": 2, "attention_bias": True, "mlp_bias": True}),
    ("mistral", {"num_key_value_heads": 2}),
    ("qwen2", {"num_key_value_heads": 2}),
])
def test_llama_family_parameter_counts_equal_real_models(family, extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                  num_attention_heads=4, **extra)
    with torch.device("meta"):
        real = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    shape = plan.ModelShape.from_config(config)
    assert shape.num_parameters() == real and shape.gated_mlp


def test_auto_lora_targets_follow_the_architecture():
    from transformers import AutoConfig

    llama = plan.ModelShape.from_config(AutoConfig.for_model("llama", hidden_size=64, intermediate_size=160,
                                                             num_hidden_layers=2, num_attention_heads=4))
    cfg = load_config(SEED, ["lora.target_modules=auto"])
    assert set(plan.lora_targets(llama, cfg)) == {"q_proj", "k_proj", "v_proj", "o_proj"}
    assert len(plan.lora_targets(llama, load_config(SEED, ["lora.target_modules=all-linear"]))) == 7
    with pytest.raises(ConfigError, match="match none of the llama linear layers"):
        plan.lora_targets(llama, load_config(SEED))  # Phi's `dense` is not a Llama layer


def test_an_unknown_architecture_is_refused_with_what_is_known():
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match="the planner knows the llama, mistral, phi, qwen2 architectures; this "
                                          "model is 'gpt2'"):
        plan.ModelShape.from_config(AutoConfig.for_model("gpt2"))


@pytest.mark.skipif(not SHARED_PHI2.is_file(), reason="../shared/models/phi-2 is not on this machine")
def test_phi2_parameter_count_and_bundled_numbers_match_the_real_config():
    from transformers import AutoConfig

    data = json.loads(SHARED_PHI2.read_text())
    config = AutoConfig.for_model(**data)
    assert plan.ModelShape.from_config(config).num_parameters() == _meta_model_parameters(config) == PHI2_PARAMETERS
    for key, value in plan.PHI2_ARCHITECTURE.items():
        assert data[key] == value, key


def test_bundled_phi2_is_used_offline():
    shape, source = plan.model_shape(load_config(SEED))
    assert shape.num_parameters() == PHI2_PARAMETERS
    assert "bundled" in source or "cache" in source


def test_model_config_from_a_file_and_a_local_model_folder(tmp_path):
    from transformers import PhiConfig

    config = PhiConfig(vocab_size=500, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=4)
    config.save_pretrained(tmp_path)
    by_file, source = plan.model_shape(load_config(SEED), str(tmp_path / "config.json"))
    assert source == str(tmp_path / "config.json")
    by_folder, _ = plan.model_shape(load_config(SEED, [f"model.base={tmp_path}"]))
    assert by_file == by_folder and by_file.num_parameters() == _meta_model_parameters(config)


def test_unknown_hub_model_offline_asks_for_a_model_config():
    with pytest.raises(ConfigError, match="--model-config"):
        plan.model_shape(load_config(SEED, ["model.base=someone/not-cached-model"]))


def test_quant_constants_hand_computed():
    # 65,536 weights: 1,024 blocks of 64 -> 1,024 one-byte absmax, 4 fp32 second-level constants (one per 256
    # blocks), a 256-entry fp32 code, an fp32 offset and the 16-entry fp32 NF4 table.
    assert plan.quant_constant_bytes(65_536, double_quant=True) == 1_024 + 16 + 1_024 + 4 + 64
    assert plan.quant_constant_bytes(65_536, double_quant=False) == 1_024 * 4 + 64


def _quant_state_bytes(model) -> int:
    """The bytes of every 4-bit weight's quantization state (not counted by get_memory_footprint)."""
    import bitsandbytes as bnb

    total = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            state = module.weight.quant_state
            tensors = [state.absmax, state.code, state.offset]
            if state.nested:
                tensors += [state.state2.absmax, state.state2.code]
            total += sum(t.numel() * t.element_size() for t in tensors if t is not None)
    return total


def test_4bit_weight_estimate_matches_bitsandbytes_on_cpu(tmp_path):
    """A hidden-256, 4-layer Phi quantized by bitsandbytes on this CPU, against the planner's arithmetic."""
    from transformers import BitsAndBytesConfig, PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                       num_attention_heads=4, max_position_embeddings=256)
    PhiForCausalLM(config).save_pretrained(tmp_path)
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float16)
    try:
        model = PhiForCausalLM.from_pretrained(tmp_path, quantization_config=quantization, dtype=torch.float16,
                                               device_map={"": "cpu"})
    except Exception as exc:  # pragma: no cover - depends on the bitsandbytes build
        pytest.skip(f"bitsandbytes cannot quantize on this CPU ({exc}); the arithmetic is tested above")
    parts = list(plan.weight_parts(plan.ModelShape.from_config(config), load_config(SEED), training=False).values())
    packed, constants, unquantized = parts
    assert packed + unquantized == model.get_memory_footprint(return_buffers=False)
    assert constants == _quant_state_bytes(model)
    footprint = model.get_memory_footprint()  # with buffers, without the quantization state
    assert abs(sum(parts) - footprint) / footprint < 0.05


@pytest.fixture(scope="module")
def small_phi(tmp_path_factory):
    """A hidden-256, 2-layer Phi saved to a folder (resid_pdrop 0: see the activation test)."""
    from transformers import PhiConfig, PhiForCausalLM

    config = PhiConfig(vocab_size=1000, hidden_size=256, intermediate_size=1024, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, resid_pdrop=0.0)
    folder = tmp_path_factory.mktemp("small-phi")
    PhiForCausalLM(config).save_pretrained(folder)
    return config, folder


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_layer_activation_formula_matches_what_autograd_saves(small_phi, attention):
    """The QLoRA training path on CPU under bf16 autocast: every tensor one decoder layer saves for backward.

    Dropout is off because CPU dropout keeps fp32 masks where CUDA keeps 1-byte ones; everything else (fp32
    residual stream and MLP after prepare_model_for_kbit_training, compute-dtype LoRA inputs and attention)
    is the same code path as on a GPU.
    """
    from phi2sum.model import attach_lora, load_base_model

    config, folder = small_phi
    batch, seq = 2, 64
    cfg = load_config(SEED, [f"model.base={folder}", "model.dtype=bfloat16", "model.device=cpu",
                             "model.gradient_checkpointing=false", f"model.attn_implementation={attention}",
                             f"prompt.max_length={seq}", "generation.max_new_tokens=8", "lora.dropout=0"])
    model = attach_lora(load_base_model(cfg, training=True), cfg)
    model.train()
    saved: dict[int, int] = {}
    recording = [False]
    # Activations lead with the batch, the batch x tokens, or the batch x heads (bmm); weights and RoPE do not.
    leading = {batch, batch * seq, batch * config.num_attention_heads}

    def pack(t):
        if recording[0] and t.shape and t.shape[0] in leading:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    layer = model.base_model.model.model.layers[1]
    layer.register_forward_pre_hook(lambda *_: recording.__setitem__(0, True))
    layer.register_forward_hook(lambda *_: recording.__setitem__(0, False))
    ids = torch.randint(config.vocab_size, (batch, seq))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(input_ids=ids, labels=ids)
    measured = sum(saved.values()) / (batch * seq)
    assert measured == plan.layer_activation_bytes(plan.ModelShape.from_config(config), cfg, seq)


@pytest.fixture(scope="module")
def phi2():
    return plan.ModelShape.from_config(__import__("transformers").AutoConfig.for_model(**plan.PHI2_ARCHITECTURE))


def _activations(estimate: plan.Estimate) -> int:
    return next(n for label, n in estimate.parts.items() if label.startswith("activations"))


def test_gradient_checkpointing_lowers_activation_memory(phi2):
    cfg = load_config(SEED)
    with_ckpt = plan.train_memory(phi2, cfg, gradient_checkpointing=True)
    without = plan.train_memory(phi2, cfg, gradient_checkpointing=False)
    assert _activations(with_ckpt) * 4 < _activations(without)
    assert with_ckpt.total < without.total


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_memory_grows_with_the_batch(phi2, attention):
    cfg = load_config(SEED, [f"model.attn_implementation={attention}"])
    train = [plan.train_memory(phi2, cfg, b).total for b in range(1, 17)]
    generation = [plan.generation_memory(phi2, cfg, b).total for b in range(1, 17)]
    assert train == sorted(set(train)) and generation == sorted(set(generation))


def test_seed_recipe_fits_a_t4():
    cfg = load_config(SEED)
    result = plan.plan(cfg, "T4")
    assert result.fits and result.max_train_batch >= cfg.train.batch_size
    assert result.max_generation_batch >= cfg.generation.batch_size
    text = plan.main_text(cfg, "T4")
    verdict = text.splitlines()[-1]
    assert verdict.startswith("FITS on one T4"), text
    assert "DOES NOT FIT" not in text and "2,779,683,840" in text


def test_absurd_config_does_not_fit():
    cfg = load_config(SEED, ["prompt.max_length=65536", "train.batch_size=64", "model.gradient_checkpointing=false"])
    assert not plan.plan(cfg, "T4").fits
    assert plan.main_text(cfg, "H100").splitlines()[-1].startswith("DOES NOT FIT on one H100")


def test_unknown_gpu_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown GPU 'V100'"):
        plan.main_text(load_config(SEED), "V100")


@pytest.mark.parametrize("device_name, key", [
    ("Tesla T4", "T4"), ("NVIDIA L4", "L4"), ("NVIDIA A10G", "A10G"), ("NVIDIA A100-SXM4-40GB", "A100-40GB"),
    ("NVIDIA A100-SXM4-80GB", "A100-80GB"), ("NVIDIA A100 80GB PCIe", "A100-80GB"),
    ("NVIDIA H100 80GB HBM3", "H100"), ("NVIDIA H100 PCIe", "H100-PCIE"), ("NVIDIA H200", "H200"),
    ("t4", "T4"), ("a100-80gb", "A100-80GB"),
])
def test_device_names_map_to_the_gpu_table(device_name, key):
    assert plan.find_gpu(device_name) is plan.GPUS[key]


def test_unlisted_cards_are_not_guessed():
    assert plan.find_gpu("NVIDIA L40S") is None and plan.find_gpu("Tesla V100-SXM2-16GB") is None


def test_generation_batch_size_shrinks_with_beams():
    sizes = [plan.generation_batch_size(load_config(SEED, [f"generation.num_beams={k}"]), gpu="T4")
             for k in (1, 2, 4, 8)]
    assert all(size >= 1 for size in sizes)
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > sizes[-1]


def test_generation_batch_size_limits():
    cfg = load_config(SEED)
    assert plan.generation_batch_size(cfg, total_memory_bytes=1 * plan.GIB) == 1  # even 1 does not fit: 1
    assert plan.generation_batch_size(cfg, gpu="H200") == plan.MAX_GENERATION_BATCH
    if not torch.cuda.is_available():
        assert plan.generation_batch_size(cfg) == plan.CPU_GENERATION_BATCH


def test_flops_and_mfu_arithmetic(phi2):
    no_ckpt = plan.train_flops_per_token(phi2, 512, gradient_checkpointing=False)
    ckpt = plan.train_flops_per_token(phi2, 512, gradient_checkpointing=True)
    assert ckpt == pytest.approx(1.5 * no_ckpt)
    # Phi-2 with checkpointing is about 6 x its 2.65e9 matmul weights per token, attention adding ~3%.
    assert ckpt == pytest.approx(6 * phi2.matmul_parameters(), rel=0.05)
    assert plan.mfu(1000, 65e9, 65.0) == pytest.approx(1.0)
    assert plan.mfu(500, 16e9, 65.0) == pytest.approx(500 * 16e9 / 65e12)


def test_merged_generation_weights_and_when_auto_uses_them():
    from transformers import AutoConfig

    cfg = load_config(SEED)
    shape = plan.ModelShape.from_config(AutoConfig.for_model(**plan.PHI2_ARCHITECTURE))
    merged, four_bit = (plan.generation_memory(shape, cfg, 8, m) for m in (True, False))
    [weights] = [v for k, v in merged.parts.items() if k.startswith("merged weights")]
    assert weights == shape.num_parameters() * 2  # fp16: the dequantized base with the adapter merged in
    assert merged.total > four_bit.total
    assert plan.merged_generation(shape, cfg, plan.GPUS["T4"].memory_bytes)  # Phi-2 in fp16 fits a T4
    assert not plan.merged_generation(shape, cfg, 6 * plan.GIB)  # a 6 GB card: 4-bit weights
    assert not plan.merged_generation(shape, load_config(SEED, ["generation.weights=4bit"]), plan.GPUS["H200"].memory_bytes)
    assert "on 4-bit weights with the adapter unmerged" in plan.main_text(cfg)


def test_auto_micro_batch_keeps_the_examples_per_step():
    assert plan.split_micro_batch(8, 15) == (8, 1)
    assert plan.split_micro_batch(8, 5) == (4, 2)
    assert plan.split_micro_batch(12, 5) == (4, 3)
    assert plan.split_micro_batch(7, 4) == (1, 7)  # a prime: no larger divisor
    text = plan.main_text(load_config(SEED, ["train.batch_size=auto"]))
    assert "training: micro-batch 8 x 512 tokens, grad_accum 1" in text  # 15 fit a T4, 8 divides 8
