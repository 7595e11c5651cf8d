import random

import pytest
import torch

from magma_ipu.config import MagmaConfig, ModelConfig
from magma_ipu.scenes import random_scene
from magma_ipu.session import Magma, build_model
from magma_ipu.text import train_byte_level_bpe

torch.set_num_threads(2)


def pytest_addoption(parser):
    parser.addoption("--long-tests", action="store_true", help="also run the slow tests")


def pytest_configure(config):
    config.addinivalue_line("markers", "long: slow test, run with --long-tests")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--long-tests"):
        return
    skip = pytest.mark.skip(reason="slow: run with --long-tests")
    for item in items:
        if "long" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    rng = random.Random(0)
    texts = [p + a for _ in range(300) for p, a in random_scene(rng).examples()]
    texts += ["héllo wörld € ✓ 日本語 🙂", "The quick brown fox jumps over the lazy dog."]
    return train_byte_level_bpe(texts, 320)


def tiny_config(vocab_size: int, **overrides) -> MagmaConfig:
    model = ModelConfig(
        n_layer=3, d_model=64, n_head=4, rotary_dim=8, d_ff=256, vocab_size=vocab_size,
        lm_head_size=vocab_size + 40, adapter_downsample=4, image_layers=(1, 2, 1, 1),
        image_width=8, image_resolution=64,
    )
    return MagmaConfig(model=model, sequence_length=48, max_out_tokens=8).replace(**overrides)


@pytest.fixture(scope="session")
def tiny_cfg(tokenizer):
    return tiny_config(len(tokenizer))


@pytest.fixture(scope="session")
def tiny_magma(tiny_cfg, tokenizer):
    model = build_model(tiny_cfg, None)
    with torch.no_grad():  # give BatchNorm non-trivial statistics so the image path is exercised
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
    return Magma(tiny_cfg, model, tokenizer)
