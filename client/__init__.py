"""The hospital node: Flower ClientApp, local training, site data, the node's commands.

Never imports ``server``; shares only ``shared`` with it.
"""
