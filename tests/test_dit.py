"""DiT: shapes, adaLN-Zero initialisation, attention modes, forward-mode JVP, size and label checks."""

from __future__ import annotations

import math

import pytest
import torch

from ucgm_core.dit import (
    DIT_PRESETS,
    DiT,
    DiTSettings,
    build_dit,
    dit_parameter_count,
    sincos_position_embedding_2d,
)

NUM_CLASSES = 10
TINY = DiTSettings(size="tiny", hidden_size=32, depth=2, num_heads=2)


def perturbed_tiny_dit(*, dtype: torch.dtype = torch.float32, two_time: bool = False, seed: int = 0) -> DiT:
    """A tiny DiT whose zero-initialised layers are randomised, so its output depends on everything."""
    torch.manual_seed(seed)
    settings = DiTSettings(size="tiny", hidden_size=32, depth=2, num_heads=2, two_time=two_time)
    model = build_dit(settings, input_size=8, in_channels=1, num_classes=NUM_CLASSES).to(dtype)
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator, dtype=dtype))
    return model


def batch(size: int = 3, dtype: torch.dtype = torch.float32, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(size, 1, 8, 8, generator=generator, dtype=dtype)
    t = torch.rand(size, generator=generator, dtype=dtype)
    labels = torch.randint(0, NUM_CLASSES + 1, (size,), generator=generator)
    return x, t, labels


def test_output_has_the_input_shape_for_rgb_and_grayscale():
    for channels, size in ((1, 8), (3, 16)):
        model = build_dit(TINY, input_size=size, in_channels=channels, num_classes=NUM_CLASSES)
        x = torch.randn(2, channels, size, size)
        out = model(x, torch.rand(2), torch.tensor([0, NUM_CLASSES]))
        assert out.shape == x.shape


def test_untrained_model_outputs_exactly_zero():
    model = build_dit(TINY, input_size=8, in_channels=1, num_classes=NUM_CLASSES)
    x, t, labels = batch()
    assert torch.count_nonzero(model(x, t, labels)) == 0


def test_output_depends_on_time_labels_and_image_after_perturbation():
    model = perturbed_tiny_dit()
    x, t, labels = batch()
    reference = model(x, t, labels)
    assert not torch.allclose(reference, model(x, 1 - t, labels))
    assert not torch.allclose(reference, model(x, t, (labels + 1) % NUM_CLASSES))
    assert not torch.allclose(reference, model(x + 1, t, labels))


def test_math_attention_equals_fused_attention():
    model = perturbed_tiny_dit()
    x, t, labels = batch()
    model.set_attention("fused")
    fused = model(x, t, labels)
    model.set_attention("math")
    math_output = model(x, t, labels)
    assert model.attention_mode == "math"
    torch.testing.assert_close(math_output, fused, rtol=1e-5, atol=1e-5)


def test_jvp_in_time_with_math_attention_matches_central_difference_in_float64():
    model = perturbed_tiny_dit(dtype=torch.float64)
    model.set_attention("math")
    x, t, labels = batch(dtype=torch.float64)
    _, tangent = torch.func.jvp(lambda time: model(x, time, labels), (t,), (torch.ones_like(t),))
    # The embedding reads 1000 t, so derivatives are large and curvature high: a small step keeps
    # the O(h^2) truncation error (~1e-9 relative here) well below the tolerance.
    step = 1e-7
    with torch.no_grad():
        difference = (model(x, t + step, labels) - model(x, t - step, labels)) / (2 * step)
    scale = tangent.detach().abs().max()
    assert scale > 1.0  # the check is not vacuous
    torch.testing.assert_close(tangent, difference, rtol=1e-6, atol=1e-6 * float(scale))


def test_two_time_model_responds_to_r_and_defaults_r_to_t():
    model = perturbed_tiny_dit(two_time=True)
    x, t, labels = batch()
    torch.testing.assert_close(model(x, t, labels), model(x, t, labels, r=t))
    assert not torch.allclose(model(x, t, labels, r=torch.zeros_like(t)), model(x, t, labels, r=t))


def test_fresh_two_time_model_ignores_r():
    model = build_dit(
        DiTSettings(size="tiny", hidden_size=32, depth=2, num_heads=2, two_time=True),
        input_size=8, in_channels=1, num_classes=NUM_CLASSES,
    )
    x, t, labels = batch()
    # Zero-initialised r embedder: the conditioning vector is the one-time model's.
    c_without = model.t_embedder(t) + model.y_embedder(labels)
    c_with = c_without + model.r_embedder(torch.zeros_like(t))
    torch.testing.assert_close(c_with, c_without)


def test_null_label_is_accepted_and_out_of_range_labels_are_rejected():
    model = build_dit(TINY, input_size=8, in_channels=1, num_classes=NUM_CLASSES)
    x, t, _ = batch(size=2)
    model(x, t, torch.tensor([NUM_CLASSES, 0]))
    assert model.num_classes == NUM_CLASSES
    assert model.y_embedder.num_embeddings == NUM_CLASSES + 1
    with pytest.raises(ValueError, match=r"labels must be in \[0, 10\]"):
        model(x, t, torch.tensor([NUM_CLASSES + 1, 0]))
    with pytest.raises(ValueError, match=r"labels must be in"):
        model(x, t, torch.tensor([-1, 0]))


def test_wrong_input_size_or_channels_raise_clear_errors():
    with pytest.raises(ValueError, match="not divisible by patch_size"):
        build_dit(DiTSettings(size="tiny", patch_size=3), input_size=8, in_channels=1, num_classes=NUM_CLASSES)
    model = build_dit(TINY, input_size=8, in_channels=1, num_classes=NUM_CLASSES)
    labels = torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"built for inputs of shape \(B, 1, 8, 8\)"):
        model(torch.randn(2, 1, 16, 16), torch.rand(2), labels)
    with pytest.raises(ValueError, match=r"built for inputs of shape \(B, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), torch.rand(2), labels)


def test_settings_validate_fields():
    with pytest.raises(ValueError, match="size must be one of"):
        DiTSettings(size="XXL")
    with pytest.raises(ValueError, match="divisible by num_heads"):
        DiTSettings(size="tiny", hidden_size=100, num_heads=3)
    with pytest.raises(ValueError, match="attention must be one of"):
        DiTSettings(attention="flash")  # type: ignore[arg-type]
    assert DiTSettings(size="XL").dimensions == DIT_PRESETS["XL"] == (1152, 28, 16)


def test_xl2_parameter_count_on_meta_device_is_about_675m():
    count = dit_parameter_count(DiTSettings(size="XL", patch_size=2), input_size=32, in_channels=4, num_classes=1000)
    # 674,816,272 with our fixed (buffer) positions and 4 output channels; the paper's 675M counts
    # DiT's 8 learned-sigma output channels and its frozen position parameter.
    assert count == 674_816_272
    assert abs(count - 675e6) / 675e6 < 0.01


def test_tiny_preset_parameter_count_matches_a_hand_count():
    hidden, depth, patch, channels, classes, freq = 128, 4, 2, 1, 10, 256
    mlp_hidden = 4 * hidden
    block = (
        hidden * 3 * hidden + 3 * hidden        # qkv
        + hidden * hidden + hidden              # attention projection
        + hidden * mlp_hidden + mlp_hidden      # mlp fc1
        + mlp_hidden * hidden + hidden          # mlp fc2
        + hidden * 6 * hidden + 6 * hidden      # adaLN modulation
    )
    expected = (
        channels * patch * patch * hidden + hidden          # patch embedding
        + freq * hidden + hidden + hidden * hidden + hidden  # time MLP
        + (classes + 1) * hidden                             # labels + null
        + depth * block
        + hidden * 2 * hidden + 2 * hidden                   # final adaLN
        + hidden * patch * patch * channels + patch * patch * channels  # output
    )
    assert dit_parameter_count(DiTSettings(), input_size=8, in_channels=1, num_classes=classes) == expected


def test_position_embedding_is_sin_cos_of_row_and_column():
    table = sincos_position_embedding_2d(hidden_size=8, grid_size=3)
    # token (row 2, col 1) is index 7; quarter width 2 -> frequencies 1 and 1/100
    row, col = 2.0, 1.0
    expected = [math.sin(row), math.sin(row / 100), math.cos(row), math.cos(row / 100),
                math.sin(col), math.sin(col / 100), math.cos(col), math.cos(col / 100)]
    torch.testing.assert_close(table[7], torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_bf16_autocast_forward_runs_and_stays_close_to_float32():
    model = perturbed_tiny_dit()
    x, t, labels = batch()
    reference = model(x, t, labels)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        low = model(x, t, labels)
    assert low.dtype == torch.bfloat16
    relative = (low.float() - reference).norm() / reference.norm()
    assert relative < 0.05
