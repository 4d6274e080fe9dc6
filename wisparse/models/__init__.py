"""Model loading and the per-family adapters."""
from wisparse.models.adapters import ADAPTERS, Adapter, Site, adapter_for, supported_model_types
from wisparse.models.loading import BUILTIN_NAME, load_model

__all__ = ["ADAPTERS", "Adapter", "BUILTIN_NAME", "Site", "adapter_for", "load_model", "supported_model_types"]
