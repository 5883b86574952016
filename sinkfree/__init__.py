"""sinkfree: train transformers without attention or residual sinks, with fast attention."""
__version__ = "0.1.0"
