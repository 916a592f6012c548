"""Code both sides of a fedhelix federation agree on: config, data contract, models, metrics.

Nothing here talks to Flower's server or client machinery; ``server`` and
``client`` import this package and never each other.
"""

__version__ = "0.1.0"
