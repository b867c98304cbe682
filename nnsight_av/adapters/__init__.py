"""Built-in adapters; importing this package registers them."""

from .base import Adapter, get_adapter, register_adapter, registered_adapters
from .qwen2_5_omni import Qwen25OmniAdapter

__all__ = ["Adapter", "Qwen25OmniAdapter", "get_adapter", "register_adapter", "registered_adapters"]
