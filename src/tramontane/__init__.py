"""tramontane: run, serve, quantize and fine-tune Mistral-family open-weight models."""

from .api import LLM, load
from .config import ModelConfig, MoeConfig
from .decoding.sampling import SamplingParams
from .errors import ConfigError, LoadError, RequestError, TemplateError, TokenizerError, TramontaneError

__all__ = [
    "LLM",
    "ConfigError",
    "LoadError",
    "ModelConfig",
    "MoeConfig",
    "RequestError",
    "SamplingParams",
    "TemplateError",
    "TokenizerError",
    "TramontaneError",
    "load",
]
__version__ = "0.1.0"
