from .gptj import GPTJ, KVCache
from .image_encoder import ModifiedResNet
from .image_prefix import ImagePrefix
from .magma import MagmaModel

__all__ = ["GPTJ", "ImagePrefix", "KVCache", "MagmaModel", "ModifiedResNet"]
