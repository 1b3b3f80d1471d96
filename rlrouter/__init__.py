"""rlrouter: train, evaluate and serve budget-aware routers for multi-step LLM agents."""

__version__ = "0.1.0"
