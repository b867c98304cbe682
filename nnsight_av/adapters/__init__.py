"""Built-in adapters; importing this package registers them."""

from .base import Adapter, get_adapter, register_adapter, registered_adapters
from .qwen2_5_omni import Qwen25OmniAdapter
from .qwen3_omni import Qwen3OmniAdapter
from .salmonn_style import SalmonnStyleAdapter

__all__ = ["Adapter", "Qwen25OmniAdapter", "Qwen3OmniAdapter", "SalmonnStyleAdapter", "get_adapter",
           "register_adapter", "registered_adapters"]
