"""The RN50x16 trunk: exact key/shape list at full size, and a numerical check against an
independent functional formulation (torch.nn.functional ops driven by the state dict alone)."""

import torch
import torch.nn.functional as F

from magma_ipu.config import MagmaConfig, ModelConfig
from magma_ipu.model import MagmaModel, ModifiedResNet


def sheet_keys(layers=(6, 8, 18, 8), width=96) -> dict[str, tuple]:
    """The image_prefix.enc key list the reference sheet describes, written out independently."""
    keys = {}

    def conv_bn(prefix, conv, bn, cin, cout, k):
        keys[f"{prefix}{conv}.weight"] = (cout, cin, k, k)
        for p in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}{bn}.{p}"] = (cout,)
        keys[f"{prefix}{bn}.num_batches_tracked"] = ()

    half = width // 2
    conv_bn("", "conv1", "bn1", 3, half, 3)
    conv_bn("", "conv2", "bn2", half, half, 3)
    conv_bn("", "conv3", "bn3", half, width, 3)
    cin = width
    for k, blocks in enumerate(layers):
        planes = width * 2**k
        for j in range(blocks):
            p = f"layer{k + 1}.{j}."
            conv_bn(p, "conv1", "bn1", cin, planes, 1)
            conv_bn(p, "conv2", "bn2", planes, planes, 3)
            conv_bn(p, "conv3", "bn3", planes, planes * 4, 1)
            if j == 0:
                conv_bn(p, "downsample.0", "downsample.1", cin, planes * 4, 1)
            cin = planes * 4
    return keys


def test_full_size_model_has_exactly_the_sheet_keys_and_shapes():
    with torch.device("meta"):
        model = MagmaModel(ModelConfig())
    state = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    enc = {k[len("image_prefix.enc."):]: v for k, v in state.items() if k.startswith("image_prefix.enc.")}
    assert enc == sheet_keys()
    assert not any("attnpool" in k for k in state)
    assert state["image_prefix.proj.weight"] == (4096, 3072)
    assert state["image_prefix.ln.weight"] == (4096,)
    assert state["lm.transformer.wte.weight"] == (50258, 4096)
    assert state["lm.lm_head.weight"] == (50400, 4096) and state["lm.lm_head.bias"] == (50400,)
    block = {k[len("lm.transformer.h.27."):]: v for k, v in state.items() if k.startswith("lm.transformer.h.27.")}
    assert block == {
        "ln_1.weight": (4096,), "ln_1.bias": (4096,),
        "attn.attention.q_proj.weight": (4096, 4096), "attn.attention.k_proj.weight": (4096, 4096),
        "attn.attention.v_proj.weight": (4096, 4096), "attn.attention.out_proj.weight": (4096, 4096),
        "mlp.0.c_fc.weight": (16384, 4096), "mlp.0.c_fc.bias": (16384,),
        "mlp.0.c_proj.weight": (4096, 16384), "mlp.0.c_proj.bias": (4096,),
        "mlp.1.adapter.0.weight": (1024, 4096), "mlp.1.adapter.0.bias": (1024,),
        "mlp.1.adapter.2.weight": (4096, 1024), "mlp.1.adapter.2.bias": (4096,),
    }
    assert not any(k.startswith("lm.transformer.h.28.") for k in state)
    lm_params = sum(v.numel() for k, v in model.lm.named_parameters() if ".adapter." not in k)
    adapter_params = sum(v.numel() for k, v in model.lm.named_parameters() if ".adapter." in k)
    assert 6.0e9 < lm_params < 6.1e9  # GPT-J 6B (with MAGMA's 50258-row embedding)
    assert 6.25e9 < lm_params + adapter_params < 6.35e9


def test_full_size_image_tokens_are_144_of_3072_features():
    cfg = MagmaConfig().model
    assert (cfg.image_tokens, cfg.image_features, cfg.image_grid) == (144, 3072, 12)
    with torch.device("meta"):
        trunk = ModifiedResNet(cfg.image_layers, cfg.image_width)
        out = trunk(torch.empty(2, 3, 384, 384))
    assert tuple(out.shape) == (2, 3072, 12, 12)


def functional_trunk(state: dict, x: torch.Tensor, layers) -> torch.Tensor:
    def bn(prefix, y):
        return F.batch_norm(y, state[f"{prefix}.running_mean"], state[f"{prefix}.running_var"],
                            state[f"{prefix}.weight"], state[f"{prefix}.bias"], False, 0.0, 1e-5)

    x = F.relu(bn("bn1", F.conv2d(x, state["conv1.weight"], stride=2, padding=1)))
    x = F.relu(bn("bn2", F.conv2d(x, state["conv2.weight"], padding=1)))
    x = F.relu(bn("bn3", F.conv2d(x, state["conv3.weight"], padding=1)))
    x = F.avg_pool2d(x, 2)
    for k, blocks in enumerate(layers):
        for j in range(blocks):
            p = f"layer{k + 1}.{j}"
            stride = 2 if (j == 0 and k > 0) else 1
            y = F.relu(bn(f"{p}.bn1", F.conv2d(x, state[f"{p}.conv1.weight"])))
            y = F.relu(bn(f"{p}.bn2", F.conv2d(y, state[f"{p}.conv2.weight"], padding=1)))
            if stride > 1:
                y = F.avg_pool2d(y, stride)
            y = bn(f"{p}.bn3", F.conv2d(y, state[f"{p}.conv3.weight"]))
            shortcut = x
            if f"{p}.downsample.0.weight" in state:
                shortcut = F.avg_pool2d(x, stride) if stride > 1 else x
                shortcut = bn(f"{p}.downsample.1", F.conv2d(shortcut, state[f"{p}.downsample.0.weight"]))
            x = F.relu(y + shortcut)
    return x


@torch.inference_mode()
def test_trunk_matches_a_functional_formulation():
    torch.manual_seed(0)
    layers, width = (2, 1, 3, 1), 16
    trunk = ModifiedResNet(layers, width).eval()
    for m in trunk.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(2, 3, 96, 96)
    ours = trunk(x)
    reference = functional_trunk(trunk.state_dict(), x, layers)
    assert ours.shape == (2, width * 32, 3, 3)
    assert (ours - reference).abs().max().item() < 1e-5


@torch.inference_mode()
def test_image_tokens_are_row_major_grid_cells():
    cfg = ModelConfig(n_layer=1, d_model=32, n_head=2, rotary_dim=4, d_ff=64, vocab_size=10, lm_head_size=10,
                      image_layers=(1, 1, 1, 1), image_width=8, image_resolution=96)
    model = MagmaModel(cfg).eval()
    features = torch.randn(1, cfg.image_features, 3, 3)
    model.image_prefix.enc.forward = lambda x: features
    tokens = model.image_prefix(torch.zeros(1, 3, 96, 96))
    prefix = model.image_prefix
    for row in range(3):
        for col in range(3):
            expected = prefix.ln(prefix.proj(features[0, :, row, col]))
            assert (tokens[0, row * 3 + col] - expected).abs().max().item() < 1e-5


def test_parameter_count_from_the_config_alone():
    from magma_ipu.build import lm_parameters

    for cfg in (ModelConfig(), ModelConfig(n_layer=2, d_model=64, n_head=4, rotary_dim=8, d_ff=96, vocab_size=300,
                                           lm_head_size=320)):
        with torch.device("meta"):
            model = MagmaModel(cfg)
        assert lm_parameters(cfg) == sum(p.numel() for p in model.lm.parameters())


def test_on_a_cpu_the_image_prefix_of_a_reduced_precision_model_runs_in_float32(tiny_cfg):
    from magma_ipu.build import build_model

    image = torch.randn(1, 3, tiny_cfg.model.image_resolution, tiny_cfg.model.image_resolution)
    reference = build_model(tiny_cfg, None)
    for dtype in ("bfloat16", "float16"):
        model = build_model(tiny_cfg.replace(dtype=dtype), None)
        assert model.image_prefix.proj.weight.dtype == torch.float32
        assert model.lm.transformer.wte.weight.dtype == getattr(torch, dtype)
        with torch.no_grad():
            got, want = model.embed_images(image), reference.embed_images(image)
        assert got.dtype == getattr(torch, dtype)
        # the prefix's weights were rounded to the dtype once (as loaded), its arithmetic is float32
        assert (got.float() - want).abs().max() < 0.05 * want.abs().max()
