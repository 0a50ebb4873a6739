"""An artifact proxy that build machines can trust: caching pull-through and private repositories."""

__version__ = "0.1.0"
