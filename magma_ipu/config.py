"""The one configuration object: model sizes, sequence length, files, precision, sampling defaults.

Presets live as YAML in `configs/` (`demo`, `magma_v1_500`, `magma_v1_1024`); any field can be
overridden by keyword (or by `--field value` on the command line). Paths in a YAML file that start
with `./` or `../` are resolved against that file's folder, so a config can sit next to its
checkpoint; other values are taken as given (a path, a hub reference, a hub name).
"""

from __future__ import annotations

import dataclasses
import decimal
import difflib
import math
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError, SamplingError
from .sampling import SamplingSettings, _shown

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # linked as configs/ at the repository root
DTYPES = ("float32", "bfloat16", "float16")
QUANTIZATIONS = ("none", "int8")
_SAMPLING = SamplingSettings()
AUTO = "auto"  # device, dtype and quantize: decided at load time from the machine (resources.py)
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
# Rotary angles are position x frequency in float32: past 2**16 positions their rounding error
# passes ~0.004 rad and grows with the position (GPT-J itself was trained on 2048). Bounds the key/value
# cache too: 2 x layers x positions x d_model values, allocated whole for every session.
MAX_POSITIONS = 2**16
MAX_IMAGE_TIMEOUT = 86_400.0  # one day: sockets and timers refuse timeouts past ~2**33 s
MAX_IMAGE_BYTES = 2**30  # an image file is read whole into memory
_LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets


def torch_dtype(name: str):
    """The torch dtype of a config dtype name."""
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def parse_bytes(text: str) -> int:
    """'6GiB', '500MB', '1e9' -> bytes (at least 1, finite)."""
    match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
    try:
        size = float(match.group(1)) * _UNITS[match.group(2).lower()] if match else math.nan
    except (ValueError, KeyError):  # "1.2.3", an unknown unit
        size = math.nan
    if not 1 <= size < math.inf:
        raise ValueError(f"max_device_memory must be a finite size of at least 1 byte, like '6GiB', '500MB' or a "
                         f"number of bytes, got {text!r}")
    return int(size)


@dataclass(frozen=True)
class ModelConfig:
    # language model (GPT-J)
    n_layer: int = 28
    d_model: int = 4096
    n_head: int = 16
    rotary_dim: int = 64
    d_ff: int = 16384
    vocab_size: int = 50258  # embedding rows = tokenizer size; larger ids are never produced
    lm_head_size: int = 50400
    adapter_downsample: int = 4
    # image encoder (CLIP ModifiedResNet trunk)
    image_layers: tuple[int, int, int, int] = (6, 8, 18, 8)
    image_width: int = 96
    image_resolution: int = 384

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def image_features(self) -> int:
        return self.image_width * 32

    @property
    def image_grid(self) -> int:
        return self.image_resolution // 32

    @property
    def image_tokens(self) -> int:
        return self.image_grid**2


@dataclass(frozen=True)
class MagmaConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    sequence_length: int = 500  # text tokens: prompt + generated must fit
    checkpoint: str | None = None  # file path, hub reference or URL
    checkpoint_sha256: str | None = None  # verified after a download
    convert_checkpoint: bool = True  # first load of a .pt writes a memory-mappable safetensors copy
    tokenizer: str = "gpt2"  # tokenizer.json, a folder holding one, or a hub name
    dtype: str = "float32"  # or "auto": float16 on CUDA, float32 on a CPU
    device: str = "cpu"  # "cpu", "cuda[:N]", or "auto": CUDA if there is one
    quantize: str = "none"  # "int8": int8 linear layers; "auto": int8 on a CPU when it fits
    memory_check: bool = True  # refuse at once a model the machine's free memory cannot hold
    compile: bool = False  # torch.compile the decode step (CUDA graphs on CUDA) and the prefill
    onednn: bool = True  # CPU float32: run the language model's linear layers through oneDNN (faster)
    # CPU: the image encoder in "bfloat16" (native bfloat16 CPUs) or "int8" (quantize_image.py)
    image_precision: str = "float32"
    tensor_parallel: int = 1  # processes (GPUs) the language model is split over; launch with torchrun
    max_device_memory: str | None = None  # e.g. "6GiB": blocks beyond it stream from host memory
    image_timeout: float = 10.0  # seconds to wait for an image server
    max_image_bytes: int = 50_000_000  # larger image files are refused while streaming
    max_image_pixels: int = 64_000_000  # decompression-bomb guard, checked before decoding
    # the sampling defaults of every call; a config without them takes SamplingSettings' own
    seed: int = _SAMPLING.seed
    top_p: float = _SAMPLING.top_p
    top_k: int = _SAMPLING.top_k
    temperature: float = _SAMPLING.temperature
    max_out_tokens: int = _SAMPLING.max_out_tokens
    name: str = "custom"

    def sampling(self, **overrides: Any) -> SamplingSettings:
        """This config's sampling defaults, with `overrides` (None: keep the default); not validated."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingSettings)}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingSettings(**values)

    @property
    def cache_length(self) -> int:
        """Slots of a session's key/value cache: one image's positions and sequence_length tokens."""
        return self.model.image_tokens + self.sequence_length

    def replace(self, **overrides: Any) -> "MagmaConfig":
        """A copy with fields changed; model fields may be given flat (`n_layer=2`)."""
        return _build(dataclasses.asdict(self), overrides, source="override")


MODEL_FIELDS = tuple(f.name for f in dataclasses.fields(ModelConfig))
TOP_FIELDS = tuple(f.name for f in dataclasses.fields(MagmaConfig) if f.name != "model")


def preset_names() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yml"))


def load_config(name_or_path: str | Path = "demo", **overrides: Any) -> MagmaConfig:
    """Read a preset by name (`configs/NAME.yml`) or a YAML file by path, then apply overrides."""
    path = Path(name_or_path)
    if not path.suffix:
        path = CONFIG_DIR / f"{name_or_path}.yml"
        if not path.is_file():
            raise ConfigError(
                f"unknown config {str(name_or_path)!r}{_suggest(str(name_or_path), preset_names())}; "
                f"presets: {', '.join(preset_names())}, or give a path to a .yml file"
            )
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    raw = _read_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping of fields, got {type(raw).__name__}")
    raw.setdefault("name", path.stem)
    for key in ("checkpoint", "tokenizer"):
        value = raw.get(key)
        if isinstance(value, str) and value.startswith(("./", "../")):
            raw[key] = str((path.parent / value).resolve())  # relative to the YAML file
    return _build(raw, overrides, source=str(path))


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error: PyYAML would silently
    keep the last value."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key_node.value!r} is given twice", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _read_yaml(path: Path) -> Any:
    """The YAML document in `path`; any problem is one line, with file:line:column where YAML says."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: config file is not UTF-8 text (byte 0x{data[e.start]:02x}): "
                          "save it as UTF-8") from None
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
        problem = getattr(e, "problem", None) or str(e).strip().splitlines()[0]
        context = getattr(e, "context", None)
        raise ConfigError(f"{where}: invalid YAML: {problem}" + (f" ({context})" if context else "")) from None


def _suggest(name: str, choices: list[str] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(str(name), choices, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_fields(value: Any, source: str) -> dict[str, Any]:
    if isinstance(value, ModelConfig):
        return dataclasses.asdict(value)
    if isinstance(value, Mapping):
        return dict(value)
    raise ConfigError(f"'model' in {source} must be a mapping of model fields ({', '.join(MODEL_FIELDS)}), "
                      f"got {value!r}")


def _build(raw: dict[str, Any], overrides: dict[str, Any], source: str) -> MagmaConfig:
    model = _model_fields(raw.get("model") or {}, source)
    top = {k: v for k, v in raw.items() if k != "model"}
    for key, value in overrides.items():
        if key in MODEL_FIELDS:
            model[key] = value
        elif key == "model":
            model.update(_model_fields(value, "the overrides"))
        else:
            top[key] = value
    for key in model:
        if key not in MODEL_FIELDS:
            raise ConfigError(f"unknown model field {key!r} in {source}{_suggest(key, MODEL_FIELDS)}")
    for key in top:
        if key not in TOP_FIELDS:
            raise ConfigError(
                f"unknown config field {key!r} in {source}{_suggest(key, TOP_FIELDS + MODEL_FIELDS)}"
            )
    model_cfg = ModelConfig(**{k: _coerce(ModelConfig, k, v) for k, v in model.items()})
    cfg = MagmaConfig(model=model_cfg, **{k: _coerce(MagmaConfig, k, v) for k, v in top.items()})
    _validate(cfg)
    return cfg


def _coerce(cls: type, name: str, value: Any) -> Any:
    """Turn strings from the command line (and lists from YAML) into the field's type. Nothing is
    rounded or guessed: 2.5 is no int, True no number, a list no path."""
    default = next(f for f in dataclasses.fields(cls) if f.name == name).default
    try:
        if name == "image_layers":
            if isinstance(value, str):
                value = [v for v in value.replace(",", " ").split()]
            return tuple(_integer(v) for v in value)
        if default is None and value in (None, "None", "null"):
            return None
        if isinstance(default, str) or default is None:
            if isinstance(value, bool) or not isinstance(value, (str, int, float, os.PathLike)):
                raise ValueError
            return str(value)
        if isinstance(default, bool):
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            if isinstance(value, bool) or (isinstance(value, numbers.Integral) and value in (0, 1)):
                return bool(value)
            raise ValueError
        if isinstance(default, int):
            return _integer(value)
        if isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (str, numbers.Real, decimal.Decimal)):
                raise ValueError
            return float(value)
    except (TypeError, ValueError, OverflowError):
        kind = "a list of 4 integers" if name == "image_layers" else type(default).__name__
        if default is None:
            kind = "str or null"
        raise ConfigError(f"config field {name!r} must be {kind}, got {_shown(value)}") from None
    return value


def _integer(value: Any) -> int:
    """`value` as an int if it is one exactly (the string "3", 3.0, numpy.int64(3)); ValueError if not."""
    if isinstance(value, str):
        return int(value.strip())
    if isinstance(value, bool) or not isinstance(value, (numbers.Real, decimal.Decimal)):
        raise ValueError
    number = int(value)  # OverflowError for inf, ValueError for nan
    if number != value:
        raise ValueError
    return number


def tensor_parallel_problems(m: ModelConfig, world: int) -> list[str]:
    """The sizes that `world` ranks cannot split evenly (heads, MLP, adapter, LM head rows)."""
    sizes = {"n_head": m.n_head, "d_ff": m.d_ff, "the adapter's hidden size d_model/adapter_downsample":
             m.d_model // m.adapter_downsample, "lm_head_size": m.lm_head_size}
    return [f"{name} ({n})" for name, n in sizes.items() if n % world]


def _validate(cfg: MagmaConfig) -> None:
    m = cfg.model
    positive = {
        "n_layer": m.n_layer, "d_model": m.d_model, "n_head": m.n_head, "d_ff": m.d_ff,
        "vocab_size": m.vocab_size, "lm_head_size": m.lm_head_size,
        "adapter_downsample": m.adapter_downsample, "image_width": m.image_width,
        "image_resolution": m.image_resolution, "sequence_length": cfg.sequence_length,
        "image_timeout": cfg.image_timeout, "max_image_bytes": cfg.max_image_bytes,
        "max_image_pixels": cfg.max_image_pixels, "tensor_parallel": cfg.tensor_parallel,
    }
    for name, value in positive.items():
        if not value > 0:
            raise ConfigError(f"config field {name!r} must be > 0, got {value}")
    if not cfg.image_timeout <= MAX_IMAGE_TIMEOUT:  # also inf and nan
        raise ConfigError(f"image_timeout must be a number of seconds in (0, {MAX_IMAGE_TIMEOUT:g}], "
                          f"got {cfg.image_timeout}")
    if cfg.max_image_bytes > MAX_IMAGE_BYTES:
        raise ConfigError(f"max_image_bytes must be at most {MAX_IMAGE_BYTES} (1 GiB; an image file is read whole "
                          f"into memory), got {cfg.max_image_bytes}")
    if cfg.cache_length > MAX_POSITIONS:
        raise ConfigError(
            f"sequence_length must be at most {MAX_POSITIONS - m.image_tokens} (the model addresses {MAX_POSITIONS} "
            f"positions with float32 rotary angles, {m.image_tokens} of them for the image; GPT-J was trained "
            f"on 2048), got {cfg.sequence_length}")
    bad = tensor_parallel_problems(m, cfg.tensor_parallel)
    if bad:
        raise ConfigError(f"tensor_parallel={cfg.tensor_parallel} must divide {', '.join(bad)}: "
                          "each process holds an equal share of them")
    missing = [name for name in _LAUNCHER_ENV if name not in os.environ]
    if cfg.tensor_parallel > 1 and missing:
        raise ConfigError(f"tensor_parallel={cfg.tensor_parallel} needs one process per rank, started by torchrun "
                          f"({', '.join(missing)} not set): launch with torchrun --nproc-per-node "
                          f"{cfg.tensor_parallel} run_inference.py ... --tensor_parallel {cfg.tensor_parallel}")
    if m.d_model % m.n_head:
        raise ConfigError(f"d_model ({m.d_model}) must be divisible by n_head ({m.n_head})")
    if m.rotary_dim % 2 or not 0 < m.rotary_dim <= m.head_dim:
        raise ConfigError(f"rotary_dim must be even and in [2, head_dim={m.head_dim}], got {m.rotary_dim}")
    if m.d_model % m.adapter_downsample:
        raise ConfigError(
            f"d_model ({m.d_model}) must be divisible by adapter_downsample ({m.adapter_downsample})"
        )
    if m.lm_head_size < m.vocab_size:
        raise ConfigError(f"lm_head_size ({m.lm_head_size}) must be >= vocab_size ({m.vocab_size})")
    if len(m.image_layers) != 4 or min(m.image_layers) < 1:
        raise ConfigError(f"image_layers must be 4 integers >= 1, got {list(m.image_layers)}")
    if m.image_resolution % 32:
        raise ConfigError(f"image_resolution must be a multiple of 32, got {m.image_resolution}")
    if m.image_width % 2:
        raise ConfigError(f"image_width must be even, got {m.image_width}")
    if cfg.max_device_memory is not None:
        try:
            parse_bytes(cfg.max_device_memory)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.checkpoint_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", cfg.checkpoint_sha256):
        raise ConfigError(f"checkpoint_sha256 must be 64 hex digits, got {cfg.checkpoint_sha256!r}")
    if cfg.dtype not in DTYPES + (AUTO,):
        raise ConfigError(f"dtype must be one of {', '.join(DTYPES + (AUTO,))}, got {cfg.dtype!r}")
    if cfg.quantize not in QUANTIZATIONS + (AUTO,):
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZATIONS + (AUTO,))}, got {cfg.quantize!r}")
    cuda = re.fullmatch(r"cuda(?::(\d+))?", cfg.device)
    if not (cfg.device in ("cpu", AUTO) or cuda):
        raise ConfigError(f"device must be 'cpu', 'cuda', 'cuda:N' (N a device number) or 'auto', got {cfg.device!r}")
    if cuda:
        _check_cuda(cfg.device, cuda.group(1))
    from .quantize_image import check_image_precision

    check_image_precision(cfg.image_precision, "cpu" if cfg.device == AUTO else cfg.device)
    if cfg.image_precision != "float32" and cfg.max_device_memory is not None:
        raise ConfigError(f"image_precision {cfg.image_precision} and max_device_memory do not combine: phased "
                          "execution moves the image encoder to the device; leave image_precision float32")
    if cfg.device == "cpu" and cfg.quantize == "int8" and cfg.dtype not in ("float32", AUTO):
        raise ConfigError(f"int8 on the CPU runs with float32 activations: use dtype float32 (or auto), "
                          f"not {cfg.dtype}")
    # the sampling defaults obey the same ranges as the settings of a call
    try:
        cfg.sampling().validate()
    except SamplingError as e:
        raise ConfigError(str(e)) from None


def _check_cuda(device: str, index: str | None) -> None:
    """Refuse a CUDA device this process cannot use, saying why, before anything is built on it."""
    import torch

    if not torch.cuda.is_available():
        if torch.version.cuda is None and torch.version.hip is None:
            why = f"CUDA is not available in this torch build (torch {torch.__version__} is CPU-only)"
        else:
            why = "no CUDA device is visible (check the driver and CUDA_VISIBLE_DEVICES)"
        raise ConfigError(f"device {device!r}: {why}; use --device cpu or auto")
    count = torch.cuda.device_count()
    if index is not None and int(index) >= count:
        raise ConfigError(f"device {device!r} does not exist: this machine has {count} CUDA device"
                          f"{'s' if count != 1 else ''} (cuda:0 to cuda:{count - 1})")
