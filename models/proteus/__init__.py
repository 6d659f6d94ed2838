"""Native, batched re-implementation of Proteus (Wangchentong/Proteus) that loads official checkpoints."""
from .adapter import ProteusAdapter, ProteusOutput
from .config import ProteusConfigError, model_config
from .network import ProteusNetwork

__all__ = ["ProteusAdapter", "ProteusOutput", "ProteusNetwork", "ProteusConfigError", "model_config"]
