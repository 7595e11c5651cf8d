import random

import pytest
import torch

from magma_ipu.config import MagmaConfig, ModelConfig
from magma_ipu.demo.scenes import random_scene
from magma_ipu.build import build_model
from magma_ipu.session import Magma
from magma_ipu.demo.tokenizer import train_byte_level_bpe
from step_recorder import recording_decode_steps

torch.set_num_threads(2)


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
    # plain nn.Linear layers, as checkpoints and transformers name them (test_packed covers oneDNN)
    return MagmaConfig(model=model, sequence_length=48, max_out_tokens=8, onednn=False).replace(**overrides)


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


@pytest.fixture
def record_decode_steps():
    """`with record_decode_steps(engine) as steps:` fills `steps` with the logits (B x V) of every
    decode step `engine` takes inside the block, in order (the prefill is not a decode step)."""
    return recording_decode_steps


class LocalServer:
    """A real HTTP server on 127.0.0.1 serving registered routes: path -> (status, headers, body)
    or a callable(handler) for special behaviour (slow, cut off, streaming without a length)."""

    def __init__(self):
        import http.server
        import threading

        routes = self.routes = {}
        self.requests = []
        log = self.requests

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                log.append((self.path, dict(self.headers)))
                route = routes.get(self.path)
                if route is None:
                    self.send_error(404, "Not Found")
                elif callable(route):
                    route(self)
                else:
                    status, headers, body = route
                    self.send_response(status)
                    for k, v in headers.items():
                        self.send_header(k, v)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}"

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def http_server():
    server = LocalServer()
    yield server
    server.close()


@pytest.fixture(scope="session")
def demo_magma():
    return Magma.load("demo")


@pytest.fixture(scope="session")
def demo_float_magma():
    """The demo model with plain float linear layers, to quantize or compare against."""
    return Magma.load("demo", onednn=False)


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Downloads and conversions of the tests go to a temporary cache, never the user's."""
    import os

    path = tmp_path_factory.mktemp("magma_cache")
    saved = os.environ.get("MAGMA_CACHE")
    os.environ["MAGMA_CACHE"] = str(path)
    yield path
    if saved is None:
        os.environ.pop("MAGMA_CACHE", None)
    else:
        os.environ["MAGMA_CACHE"] = saved
